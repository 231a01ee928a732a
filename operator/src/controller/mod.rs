//! The cluster controller (`weft-operator controller`).

use crate::cli::ControllerOpts;

/// Runs the controller until SIGTERM.
pub async fn run(opts: ControllerOpts) -> anyhow::Result<()> {
    anyhow::bail!(
        "the controller is not available in this build (lease {}/{})",
        opts.lease_namespace,
        opts.lease_name
    )
}
