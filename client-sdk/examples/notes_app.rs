//! An example app: keeps one persistent context across runs (its id in a file), asks a
//! question per run, and streams the answer.
//!
//! ```sh
//! cargo run --release -p llmsd-client --example notes_app -- "What is a KV cache?"
//! ```

use llmsd_client::{Client, GenerationParams};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello in five words.".to_string());
    let client = Client::connect_default("notes-example").await?;
    let id_file = std::env::temp_dir().join("llmsd-notes-example.ctx");
    // Continue yesterday's conversation if the daemon still has it.
    let ctx = match std::fs::read_to_string(&id_file) {
        Ok(id) if client.context(id.trim()).info().await.is_ok() => client.context(id.trim()),
        _ => {
            let ctx = client
                .create_context(Some("You are a concise assistant."))
                .await?;
            std::fs::write(&id_file, ctx.id())?;
            ctx
        }
    };
    let mut stream = ctx
        .chat(
            &question,
            GenerationParams {
                max_tokens: 96,
                ..Default::default()
            },
        )
        .await?;
    while let Some(t) = stream.next_token().await? {
        print!("{}", t.text);
    }
    let done = stream.completion().await?;
    println!(
        "\n[context {}: {} prompt tokens, {} of them cached]",
        ctx.id(),
        done.usage.prompt_tokens,
        done.usage.cached_tokens
    );
    Ok(())
}
