//! `weft-operator`: the node agent and (in cluster mode) the controller.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = weft_operator::cli::Cli::parse();
    weft_operator::cli::init_tracing(&cli);
    match weft_operator::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
