#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/): valid inputs of each
shape the daemon reads plus hostile variants, so fuzzing starts from real structure and CI
replays them (tests/fuzz_corpus.rs). The swap-file seed comes from Rust:
  cargo test --release -p llmsd --test fuzz_corpus -- --ignored write_swap_file_seed
"""
import json, os, struct, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(obj):
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(body)) + body


# --- socket frames: a 4-byte big-endian length, then a JSON ClientFrame ---
params = {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n"],
          "logprobs": 2, "response_format": "json_object", "priority": "background"}
frames = {
    "hello": {"type": "hello", "protocol": 1, "app": "notes"},
    "create": {"type": "request", "id": 1, "method": "create_context", "params": {"system": "Be brief."}},
    "list": {"type": "request", "id": 2, "method": "list_contexts"},
    "prompt-text": {"type": "request", "id": 3, "method": "prompt",
                    "params": {"context": "ctx-0123456789abcdef", "input": {"text": "Hello"},
                               "params": params, "stream": True}},
    "prompt-messages": {"type": "request", "id": 4, "method": "prompt",
                        "params": {"input": {"messages": [{"role": "user", "content": "Hi"}]}}},
    "cancel": {"type": "request", "id": 5, "method": "cancel", "params": {"request": 3}},
    "tokenize": {"type": "request", "id": 6, "method": "tokenize", "params": {"text": "<|im_start|>x", "special": True}},
    "fork": {"type": "request", "id": 7, "method": "fork_context", "params": {"context": "../../etc/passwd"}},
    "nan-params": {"type": "request", "id": 8, "method": "prompt",
                   "params": {"input": {"text": "x"}, "params": {"temperature": -1, "top_p": 2, "max_tokens": 0}}},
    "huge-numbers": {"type": "request", "id": 18446744073709551615, "method": "prompt",
                     "params": {"input": {"text": "x"}, "params": {"max_tokens": 4294967295, "seed": 18446744073709551615, "logprobs": 4294967295}}},
}
for name, obj in frames.items():
    put("socket_frame", name, frame(obj))
put("socket_frame", "bad-utf8", frame(b'{"type":"hello","protocol":1,"app":"\xff\xfe"}'))
put("socket_frame", "deep-nesting", frame(("[" * 2000 + "]" * 2000).encode()))
put("socket_frame", "oversized-header", struct.pack(">I", 0xFFFFFFFF) + b"{}")
put("socket_frame", "zero-header", struct.pack(">I", 0))
put("socket_frame", "truncated", frame(frames["prompt-text"])[:37])

# --- HTTP bodies: OpenAI chat/completions and completions ---
bodies = {
    "chat": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello"}],
             "max_tokens": 16, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3,
             "response_format": {"type": "json_object"}, "context": "ctx-0123456789abcdef"},
    "chat-parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "image_url", "image_url": {"url": "x"}}]}]},
    "chat-developer": {"messages": [{"role": "developer", "content": "x"}], "max_completion_tokens": 1, "n": 1},
    "completion": {"model": "m", "prompt": "Once upon", "max_tokens": 8, "echo": True, "logprobs": 2,
                   "stop": ["\n", "."], "seed": 7},
    "completion-tokens": {"prompt": [1, 2, 3]},
    "completion-list": {"prompt": ["a", "b"]},
    "wrong-types": {"messages": "hi", "max_tokens": "8", "temperature": [1], "stop": 3},
    "negative": {"messages": [{"role": "user", "content": "x"}], "temperature": -0.5, "top_p": -1,
                 "max_tokens": -3, "n": 2, "presence_penalty": 1e308, "frequency_penalty": -1e308},
    "huge": {"prompt": "x", "max_tokens": 1e30, "top_logprobs": 1e9, "seed": -1},
}
for name, obj in bodies.items():
    put("http_body", name, json.dumps(obj))
put("http_body", "nan-literal", '{"prompt":"x","temperature":NaN}')
put("http_body", "bad-utf8", b'{"prompt":"\xc3\x28"}')
put("http_body", "empty", "")

# --- chat templates: template \0 role \x01 content \0 ... ---
msgs = "\0system\x01Be brief.\0user\x01Hello <|im_end|> there\0assistant\x01Hi."
smollm_like = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
put("chat_template", "smollm2", smollm_like + msgs)
put("chat_template", "loop-bomb", "{% for i in range(100000000) %}{{ i }}{% endfor %}" + msgs)
put("chat_template", "output-bomb", "{{ 'x' * 100000000 }}" + msgs)
put("chat_template", "recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}" + msgs)
put("chat_template", "raise", "{{ raise_exception('no') }}" + msgs)
put("chat_template", "syntax-error", "{% for %}" + msgs)
put("chat_template", "tojson-strftime", "{{ messages | tojson }}{{ strftime_now('%Y') }}{{ bos_token }}" + msgs)
put("chat_template", "bad-roles", "{{ messages[0].content }}\0\x01empty role\0ro le\x01x\0" + "r" * 200 + "\x01y")
put("chat_template", "no-messages", "{{ messages[5]['content'] }}")

# --- tokenizer: arbitrary text ---
gpl = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
put("tokenizer", "gpl-head", gpl[:2000])
put("tokenizer", "unicode", "naïve café — 東京 🙂 \u200b\u0301 \r\n\t  x")
put("tokenizer", "specials", "<|im_start|>user\n<|im_end|><|endoftext|><s></s>")
put("tokenizer", "invalid-utf8", b"\xff\xfe\xc3\x28 \xe2\x82 abc \x00\x01")
# Control bytes SmolLM2 has no byte token for (0x1D here): dropped, as llama.cpp does.
put("tokenizer", "unwritable-control-bytes", b'\x92\x9e<Kve caf\xc3\xb2 \xe2\x80\x94 \xe6\x9d\x9f\x10E\xdfNS\x1bf\x7f\xe0\x1d\x7f{\xcc\x81 \n\t  x')
put("tokenizer", "spaces", " " * 300 + "\n" * 50 + "a" * 500)
put("tokenizer", "digits", "1234567890" * 30 + " 3.14159 1e-9 0x1F")

# --- app manifests (the JSON body the KV store reads at start) ---
manifest = {"app": "cli", "model": "fingerprint", "next_file": 2, "next_chunk": 3,
            "contexts": [{"id": 15414479396577327437,
                          "tokens": [504, 28807, 4660, 4837, 6966, 314, 253, 1904, 28, 3784, 8842, 9768,
                                     327, 3197, 284, 550, 5479, 282, 1806, 30],
                          "chunks": [1], "tail_file": [1, 46104, 4], "whole_file": None,
                          "created": 1795507779, "last_use": 1795507779}],
            "chunks": [{"id": 1, "precision": "int4", "file": [1, 120960, 2], "master": [1, 368640, 0],
                        "mass": 7523.4, "observations": 8910, "last_use": 1795507779}]}
put("app_manifest", "valid", json.dumps(manifest))
hostile = json.loads(json.dumps(manifest))
hostile["contexts"][0]["tokens"] = [4294967295, 49152, 0, 1]
put("app_manifest", "token-out-of-vocab", json.dumps(hostile))
hostile = json.loads(json.dumps(manifest))
hostile["next_chunk"] = 18446744073709551615
hostile["contexts"][0]["chunks"] = [7, 7, 7]
hostile["contexts"][0]["tokens"] = list(range(40))
put("app_manifest", "counter-overflow", json.dumps(hostile))
hostile = json.loads(json.dumps(manifest))
hostile["contexts"] = hostile["contexts"] * 3
hostile["chunks"][0]["mass"] = -1e308
hostile["chunks"][0]["file"] = [18446744073709551615, 18446744073709551615, 4294967295]
put("app_manifest", "duplicate-ids", json.dumps(hostile))
hostile = json.loads(json.dumps(manifest))
hostile["app"] = "../../../../tmp/escape"
put("app_manifest", "path-app-name", json.dumps(hostile))
hostile = json.loads(json.dumps(manifest))
hostile["contexts"][0]["tokens"] = list(range(300))
put("app_manifest", "longer-than-limit", json.dumps(hostile))
print("seeds written under", os.path.normpath(root), file=sys.stderr)
