//! Prints weft's CRDs as one multi-document YAML stream, or with `--write DIR` writes one file
//! per CRD (`DIR/networks.weft.dev.yaml`, ...).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen [--write DIR]\n\
    \n\
    Without arguments, prints every weft CRD as multi-document YAML on stdout.\n\
    --write DIR   writes one file per CRD into DIR (e.g. crds/generated)";

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [] => {
            let yaml =
                weft_crds::all_crds_yaml().map_err(|e| format!("cannot render the CRDs: {e}"))?;
            print!("{yaml}");
            Ok(())
        }
        [flag, dir] if flag == "--write" => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let files =
                weft_crds::generated_files().map_err(|e| format!("cannot render the CRDs: {e}"))?;
            for (name, yaml) in files {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
