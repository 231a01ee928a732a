//! GC and STATUS.

use crate::conf::Conf;
use crate::error::{self, CniError};
use tracing::info;
use weft_dataplane::ipam::{Attachment, IpamStore};
use weft_dataplane::names;
use weft_dataplane::netlink::Netlink;
use weft_dataplane::proto::{self, Request};
use weft_dataplane::state::NodeState;

/// GC: releases every allocation of the configuration's network that is not in
/// `cni.dev/valid-attachments`, and deletes the host links of those attachments (and any weft
/// host link of the network whose attachment is not valid).
pub fn gc(conf: &Conf) -> Result<(), CniError> {
    let Some(network) = conf.network.as_deref() else {
        return Ok(());
    };
    let valid: Vec<Attachment> = conf
        .valid_attachments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| Attachment {
            container_id: v.container_id,
            ifname: v.ifname,
        })
        .collect();
    let mut errors = Vec::new();
    let store = IpamStore::open(&conf.state_dir, network)?;
    let released = store.gc(&valid)?;
    // The host links of the attachments kept: the valid ones, and the interfaces their ADDs
    // made from the pods' annotation.
    let mut valid_hosts: Vec<String> = valid
        .iter()
        .map(|a| names::host_veth_name(&a.container_id, &a.ifname))
        .collect();
    valid_hosts.extend(store.list()?.iter().map(|a| a.host_link_name()));
    // The ports of the released allocations, by name too: an ADD killed between creating its
    // veth and giving it its alias (a second netlink step) left a link without the alias.
    let released_hosts: Vec<String> = released.iter().map(|a| a.host_link_name()).collect();
    let mut nl = Netlink::new()?;
    for link in nl.links()? {
        let ours = link
            .alias
            .as_deref()
            .and_then(names::endpoint_alias_network)
            == Some(network)
            || released_hosts.contains(&link.name);
        if ours && !valid_hosts.contains(&link.name) {
            if let Err(e) = nl.delete_link(link.index) {
                errors.push(format!("delete {}: {}", link.name, error::chain(&e)));
            } else {
                info!(link = %link.name, "gc: deleted host link");
            }
        }
    }
    for alloc in &released {
        info!(container_id = %alloc.container_id, ifname = %alloc.ifname, ips = ?alloc.ips, "gc: released");
        let unregister = Request::Unregister {
            network: network.to_string(),
            container_id: alloc.container_id.clone(),
            ifname: alloc.ifname.clone(),
        };
        let _ = proto::call(&conf.agent_socket, &unregister, conf.agent_timeout);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            error::IO_FAILURE,
            "GC could not remove everything",
            errors.join("; "),
        ))
    }
}

/// STATUS: 50 until the agent has prepared the node and answers on its socket.
pub fn status(conf: &Conf) -> Result<(), CniError> {
    let node = NodeState::read(&conf.state_dir).map_err(|e| {
        CniError::from_chain(
            error::NOT_AVAILABLE,
            "the weft agent has not prepared this node yet",
            &e,
        )
    })?;
    if !node.ready {
        return Err(CniError::new(
            error::NOT_AVAILABLE,
            "the weft agent has not prepared this node yet",
            format!(
                "{} says ready=false",
                NodeState::path(&conf.state_dir).display()
            ),
        ));
    }
    let reply =
        proto::call(&conf.agent_socket, &Request::Ping, conf.agent_timeout).map_err(|e| {
            CniError::from_chain(error::NOT_AVAILABLE, "the weft agent does not answer", &e)
        })?;
    if !reply.ready {
        return Err(CniError::new(
            error::NOT_AVAILABLE,
            "the weft agent has not reconciled this node yet",
            "wait for the agent's first reconcile",
        ));
    }
    if let Some(network) = conf.network.as_deref()
        && let Err(e) = weft_dataplane::state::NetworkState::read(&conf.state_dir, network)
    {
        return Err(CniError::from_chain(
            error::NOT_AVAILABLE,
            format!("network {network} is not ready on this node"),
            &e,
        ));
    }
    Ok(())
}
