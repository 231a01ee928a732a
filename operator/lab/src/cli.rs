//! Command-line interface of `weft-lab`.

use crate::file::Family;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use weft_operator::cli::LogFormat;

/// weft's lab: nodes, workloads and the outside as network namespaces, running the real agent
/// (`weft-operator`) and the real `weft` CNI binary found next to this one, checked with real
/// packets. `weft-lab FILE` runs a lab file; exits 0 when every expectation held, 1 when one
/// failed and 3 when the lab needs a kernel feature this machine lacks.
#[derive(Debug, Parser)]
#[command(
    name = "weft-lab",
    version,
    about,
    subcommand_negates_reqs = true,
    override_usage = "weft-lab [OPTIONS] FILE\n       weft-lab down [--name NAME] FILE\n       weft-lab trace --file FILE --from A --to B [OPTIONS]",
    after_help = "Exit status: 0 when every expectation held (trace: accepted), 1 when one failed (trace: denied), 3 when the lab needs a kernel feature this machine lacks."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "WEFT_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// `down FILE` or `trace --file FILE …`; without one, the lab runs on FILE.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The lab file.
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    /// Leave the lab up for exploration (`weft-lab down FILE` removes it).
    #[arg(long)]
    pub keep: bool,
    /// Name of the lab (default: derived from the file path); namespaces are `wl-<name>-…`.
    #[arg(long)]
    pub name: Option<String>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove a lab left up with `--keep`.
    Down {
        /// The lab file.
        file: PathBuf,
        /// Name of the lab, when it was started with `--name`.
        #[arg(long)]
        name: Option<String>,
    },
    /// Answer "from A to B on port P: accepted or denied, by which policy and rule" for a lab
    /// file's resources and workloads, with the compiler the agent uses, without building
    /// anything. Exits 0 when accepted, 1 when denied. (`weft-operator trace` answers it for a
    /// cluster.)
    Trace(TraceArgs),
}

/// `trace` flags.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The lab file (its resources, namespaces and workloads).
    #[arg(long)]
    pub file: PathBuf,
    /// Source: a workload, a node or `outside`.
    #[arg(long)]
    pub from: String,
    /// Destination: a workload, a node (its port forwards) or `outside`.
    #[arg(long)]
    pub to: String,
    /// The packet and the output.
    #[command(flatten)]
    pub packet: weft_operator::cli::TracePacket,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.command.is_some() && (cli.file.is_some() || cli.keep || cli.name.is_some()) {
        anyhow::bail!(
            "the lab's FILE, --keep and --name go without a subcommand; `down` takes its own FILE and --name"
        );
    }
    match cli.command {
        Some(Command::Down { file, name }) => {
            crate::down(&file, name.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Trace(t)) => {
            let p = &t.packet;
            let family = if p.ipv6 { Family::Ipv6 } else { Family::Ipv4 };
            let accepted =
                crate::run_trace(&t.file, &t.from, &t.to, p.port, &p.protocol, family, p.json)?;
            Ok(if accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        None => {
            let file = cli.file.ok_or_else(|| {
                anyhow::anyhow!("usage: weft-lab FILE [--keep] | weft-lab down FILE | weft-lab trace --file FILE …")
            })?;
            match crate::run(&file, cli.name.as_deref(), cli.keep) {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::FAILURE),
                // Said on standard output; 3 tells scripts "not checkable here".
                Err(e) if e.is::<crate::NotSupported>() => Ok(ExitCode::from(3)),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_file_runs_the_lab_and_subcommands_take_their_own_flags() {
        let cli =
            Cli::try_parse_from(["weft-lab", "examples/lab/nat.yaml", "--keep", "--name", "x"])
                .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.file, Some(PathBuf::from("examples/lab/nat.yaml")));
        assert!(cli.keep);
        assert_eq!(cli.name.as_deref(), Some("x"));

        let cli = Cli::try_parse_from(["weft-lab", "down", "lab.yaml", "--name", "x"]).unwrap();
        let Some(Command::Down { file, name }) = cli.command else {
            panic!("not down")
        };
        assert_eq!(file, PathBuf::from("lab.yaml"));
        assert_eq!(name.as_deref(), Some("x"));

        let cli = Cli::try_parse_from([
            "weft-lab",
            "--log-format",
            "json",
            "trace",
            "--file",
            "lab.yaml",
            "--from",
            "a",
            "--to",
            "b",
            "--port",
            "80",
            "--ipv6",
        ])
        .unwrap();
        let Some(Command::Trace(t)) = cli.command else {
            panic!("not trace")
        };
        assert_eq!(
            (t.from.as_str(), t.to.as_str(), t.packet.port),
            ("a", "b", 80)
        );
        assert!(t.packet.ipv6 && !t.packet.json);
        assert_eq!(t.packet.protocol, "tcp");
    }

    #[test]
    fn the_labs_own_arguments_do_not_mix_with_a_subcommand() {
        for argv in [
            &["weft-lab", "--keep", "down", "lab.yaml"][..],
            &["weft-lab", "--name", "x", "down", "lab.yaml"],
        ] {
            let err = match Cli::try_parse_from(argv) {
                Ok(cli) => run(cli).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(!err.is_empty(), "{argv:?}");
        }
    }

    #[test]
    fn the_lab_needs_a_file_and_trace_needs_from_and_to() {
        assert!(Cli::try_parse_from(["weft-lab"]).is_err());
        assert!(Cli::try_parse_from(["weft-lab", "--keep"]).is_err());
        assert!(Cli::try_parse_from(["weft-lab", "down"]).is_err());
        assert!(Cli::try_parse_from(["weft-lab", "trace", "--file", "f", "--from", "a"]).is_err());
        // The lab file of a trace is a flag, not a position.
        assert!(
            Cli::try_parse_from(["weft-lab", "trace", "f", "--from", "a", "--to", "b"]).is_err()
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
