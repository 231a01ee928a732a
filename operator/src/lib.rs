//! weft's operator: the node agent (`weft-operator agent`), the lab (`weft-operator lab`) and,
//! in cluster mode, the controller.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod lab;
pub mod policy;
pub mod uninstall;

pub use weft_dataplane::error_chain;
