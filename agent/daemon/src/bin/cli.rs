//! `nencache`: command-line access to a NenCache agent, and the demo.

use clap::Parser;
use nencache_agent::cli::{Cli, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
    let code = run(Cli::parse(), xdg.as_deref()).await?;
    std::process::exit(code);
}
