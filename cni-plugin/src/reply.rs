//! The only module that writes to stdout: the CNI result, VERSION answer or error object.

#![allow(clippy::print_stdout)]

use crate::error::CniError;
use serde::{Deserialize, Serialize};
use std::io::Write;

/// An interface of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path when the interface is inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in spec < 1.0: "4" or "6".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address with prefix length.
    pub address: String,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: String,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// DNS settings (weft leaves DNS to the runtime; the field is always present and empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// The result of ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// The spec version of this result.
    pub cni_version: String,
    /// Interfaces.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS.
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// This result after `prev`, the result of the plugins before weft in a chain, whole:
    /// their interfaces, addresses and routes first, then weft's, whose address entries point
    /// at weft's interfaces where they now are; their DNS unless weft has its own (the spec has
    /// a chained plugin pass the previous result on, changed or not). Every field of `prev`
    /// weft does not model goes on as it is.
    pub fn after(&self, prev: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        let mut out = prev;
        let ours = serde_json::to_value(self).unwrap_or_default();
        let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).cloned();
        let shift = list(&out, "interfaces").map_or(0, |i| i.len());
        if !out.is_object() {
            out = Value::Object(serde_json::Map::new());
        }
        for key in ["interfaces", "ips", "routes"] {
            let mut merged = list(&out, key).unwrap_or_default();
            for mut item in list(&ours, key).unwrap_or_default() {
                if key == "ips"
                    && let Some(i) = item.get("interface").and_then(Value::as_u64)
                {
                    item["interface"] = Value::from(i + shift as u64);
                }
                merged.push(item);
            }
            out[key] = Value::Array(merged);
        }
        if !self.dns.nameservers.is_empty() || out.get("dns").is_none() {
            out["dns"] = ours["dns"].clone();
        }
        out["cniVersion"] = ours["cniVersion"].clone();
        out
    }

    /// Adapts the result to the spec version the runtime asked for: results before 1.0.0 carry
    /// an IP `version` field; an interface's `mtu` exists since 1.1.0.
    pub fn for_version(mut self, version: &str) -> Self {
        let legacy = version.starts_with("0.");
        let has_mtu = !legacy && version != "1.0.0";
        for ip in &mut self.ips {
            ip.version = if legacy {
                Some(if ip.address.contains(':') { "6" } else { "4" }.to_string())
            } else {
                None
            };
        }
        if !has_mtu {
            for i in &mut self.interfaces {
                i.mtu = None;
            }
        }
        self.cni_version = version.to_string();
        self
    }
}

/// The VERSION answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionReply {
    /// The newest version.
    pub cni_version: String,
    /// All versions.
    pub supported_versions: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorReply<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

/// Renders an error as the spec's JSON object.
pub fn error_json(version: &str, err: &CniError) -> String {
    serde_json::to_string(&ErrorReply {
        cni_version: version,
        code: err.code,
        msg: &err.msg,
        details: &err.details,
    })
    .unwrap_or_else(|_| {
        format!(
            r#"{{"cniVersion":"{version}","code":{},"msg":"error"}}"#,
            err.code
        )
    })
}

/// Writes a JSON value and a newline to stdout.
pub fn print_json<T: Serialize>(value: &T) {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string());
    print_raw(&text);
}

/// Writes text and a newline to stdout.
pub fn print_raw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("0a:58:0a:00:00:02".into()),
                mtu: Some(1500),
                sandbox: Some("/run/netns/x".into()),
            }],
            ips: vec![
                IpConfig {
                    version: None,
                    address: "10.0.0.2/24".into(),
                    gateway: Some("10.0.0.1".into()),
                    interface: Some(0),
                },
                IpConfig {
                    version: None,
                    address: "fd00::2/64".into(),
                    gateway: Some("fd00::1".into()),
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.0.0.1".into()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_1_1_has_no_ip_version_and_0_4_has_it() {
        let v11 = serde_json::to_value(sample().for_version("1.1.0")).unwrap();
        assert!(v11["ips"][0].get("version").is_none());
        assert_eq!(v11["interfaces"][0]["mtu"], 1500);
        let v04 = serde_json::to_value(sample().for_version("0.4.0")).unwrap();
        assert_eq!(v04["cniVersion"], "0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["ips"][1]["version"], "6");
        assert!(v04["interfaces"][0].get("mtu").is_none());
        let v10 = serde_json::to_value(sample().for_version("1.0.0")).unwrap();
        assert_eq!(v10["cniVersion"], "1.0.0");
        assert!(v10["ips"][0].get("version").is_none());
        assert!(
            v10["interfaces"][0].get("mtu").is_none(),
            "an interface's mtu is new in 1.1.0"
        );
    }

    #[test]
    fn error_json_is_spec_shaped() {
        let e = CniError::new(4, "CNI_NETNS is not set", "details");
        let v: serde_json::Value = serde_json::from_str(&error_json("1.1.0", &e)).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 4);
        assert_eq!(v["msg"], "CNI_NETNS is not set");
    }
}
