//! `nencache-agent`: the node agent binary. `serve` parses flags, installs telemetry, and
//! serves until SIGTERM or SIGINT; `prepare-dir` readies a root-owned socket directory for an
//! agent that runs unprivileged (the DaemonSet's init container).

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
    Serve(Box<ServeArgs>),
    /// Give a socket directory to the agent's user (needs CAP_CHOWN): one it creates, one the
    /// user owns already, or an empty root-owned 0755 one as the kubelet creates it; anything
    /// else is refused and left alone.
    PrepareDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Owner (not root: the agent runs unprivileged).
        #[arg(long, default_value_t = 65532, value_parser = clap::value_parser!(u32).range(1..))]
        uid: u32,
        /// Group (pods that connect need it as a supplemental group).
        #[arg(long, default_value_t = 65532)]
        gid: u32,
        /// Permission bits, in octal.
        #[arg(long, default_value = "750", value_parser = parse_mode)]
        mode: u32,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 750"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Serve(args) => *args,
        Command::PrepareDir {
            dir,
            uid,
            gid,
            mode,
        } => {
            nencache_agent::socket::prepare_dir(&dir, uid, gid, mode)?;
            println!("{} ready for {uid}:{gid}, mode {mode:o}", dir.display());
            return Ok(());
        }
    };
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
    let settings = args.resolve(xdg.as_deref())?;
    let _guard = telemetry::init(
        settings.log_format,
        &settings.log_level,
        settings.otlp_endpoint.as_deref(),
        "nencache-agent",
    )?;
    if settings.default_tier
        && let Some(t) = settings.engine.tiers.first()
    {
        tracing::info!(
            path = %t.store.path.display(),
            size = %nencache_agent::config::ByteSize(t.store.capacity),
            "no tier configured: using a default disk-backed tier (set tiers in the \
             configuration file, or --nvme-size 0 to run without one)"
        );
    }
    // Not dumpable: another process of the agent's user can then neither ptrace it nor open
    // its /proc/<pid>/mem or fd entries, the last ways left to write the arena (the agent's
    // own mapping is the one writable view of it).
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    let agent = Agent::bind(settings).await?;
    agent.serve(termination_signal()).await?;
    Ok(())
}
