//! weft's operator: the node agent (`weft-operator agent`), the lab (`weft-operator lab`) and,
//! in cluster mode, the controller.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod lab;

/// Renders an error and its sources as `a: b: c`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
