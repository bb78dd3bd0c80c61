//! `nencache-agent`: the node agent binary. Parses flags, installs telemetry, and serves until
//! SIGTERM or SIGINT.

use clap::{Parser, Subcommand};
use nencache_agent::{
    config::ServeArgs,
    server::{Agent, termination_signal},
    telemetry,
};

#[derive(Parser)]
#[command(
    name = "nencache-agent",
    version,
    about = "NenCache node agent: a tiered KV cache for LLM inference served over a Unix socket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cache on a Unix socket.
    Serve(ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        command: Command::Serve(args),
    } = Cli::parse();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
    let settings = args.resolve(xdg.as_deref())?;
    let _guard = telemetry::init(
        settings.log_format,
        &settings.log_level,
        settings.otlp_endpoint.as_deref(),
        "nencache-agent",
    )?;
    let agent = Agent::bind(settings).await?;
    agent.serve(termination_signal()).await?;
    Ok(())
}
