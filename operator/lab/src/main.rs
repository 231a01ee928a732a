//! `weft-lab`: the lab and the lab-file trace.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = weft_lab::cli::Cli::parse();
    weft_operator::cli::init_tracing_with(cli.log_format, "warn");
    match weft_lab::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
