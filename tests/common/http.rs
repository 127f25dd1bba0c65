//! A plain HTTP/1.1 client over `TcpStream` for the HTTP door's tests: raw bytes in, status,
//! headers and body out (no client library, so malformed requests can be sent too).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Sends one HTTP/1.1 request on `s` (`Connection: close`, a JSON body).
pub fn send(s: &mut TcpStream, method: &str, path: &str, key: Option<&str>, body: &[u8]) {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: llmsd\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send the request head");
    s.write_all(body).expect("send the request body");
}

/// A response read to the end of the connection.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The header block, lower-cased.
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Value {
        if self.body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
        }
    }
}

/// Reads a whole response (the server closes the connection after it); `None` when the
/// connection closed without one.
pub fn read_reply(s: &mut TcpStream) -> Option<Reply> {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return None;
    }
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Some(Reply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

/// Connects to the HTTP door (reads time out after two minutes).
pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the HTTP door");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    s
}

/// One request with a raw body over a fresh connection.
pub fn request(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Reply {
    let mut s = connect(addr);
    send(&mut s, method, path, key, body);
    read_reply(&mut s).unwrap_or_else(|| panic!("{method} {path}: no response"))
}

/// One request with a JSON body (or none); (status, lower-cased headers, JSON body). Not for
/// streams.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, String, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let r = request(addr, method, path, key, body.as_bytes());
    let v = r.json();
    (r.status, r.head, v)
}

/// Prometheus text from `/metrics`.
pub fn metrics(addr: &str) -> String {
    request(addr, "GET", "/metrics", None, b"").body
}

/// The value of one sample (`name` with its labels, as printed).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .parse()
        .expect("a number")
}
