//! llmsctl: admin and user command line for llmsd.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "llmsctl",
    version,
    about = "Admin and user CLI for the llmsd service"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!("llmsctl (protocol {})", llmsd_client::PROTOCOL_VERSION);
    Ok(())
}
