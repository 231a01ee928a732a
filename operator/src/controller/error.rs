//! The controller's error type.

use kube::runtime::finalizer;

/// What went wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("{action} {kind} {name}")]
    Api {
        /// What the controller tried, e.g. `apply`.
        action: &'static str,
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A Network being deleted is still realized by agents; its finalizer stays.
    #[error("network {network} is still realized on nodes {nodes:?}; waiting for their agents")]
    AgentsStillRealize {
        /// The Network.
        network: String,
        /// The nodes whose NodeNetwork status still lists it.
        nodes: Vec<String>,
    },
    /// The finalizer helper failed to add or remove the finalizer.
    #[error("finalizer of network {network}")]
    Finalizer {
        /// The Network.
        network: String,
        /// The helper's error.
        #[source]
        source: Box<finalizer::Error<Error>>,
    },
    /// An object without a name (cannot happen with objects from the API).
    #[error("{kind} has no metadata.name")]
    Unnamed {
        /// Kind of the object.
        kind: &'static str,
    },
    /// A value could not be serialized into a patch.
    #[error("serialize the {what}")]
    Serialize {
        /// What was serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A short, bounded label for metrics and event reasons (PascalCase).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Api { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "Conflict",
                kube::Error::Api(s) if s.code == 403 => "Forbidden",
                kube::Error::Api(s) if s.code == 404 => "NotFound",
                kube::Error::Api(s) if s.code == 422 => "Rejected",
                kube::Error::Api(s) if s.code >= 500 => "ApiServerError",
                kube::Error::Api(_) => "ApiError",
                _ => "ApiUnavailable",
            },
            Error::AgentsStillRealize { .. } => "WaitingForAgents",
            Error::Finalizer { source, .. } => match source.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.reason(),
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => {
                    "FinalizerPatchFailed"
                }
                finalizer::Error::UnnamedObject => "Unnamed",
                finalizer::Error::InvalidFinalizer => "InvalidFinalizer",
            },
            Error::Unnamed { .. } => "Unnamed",
            Error::Serialize { .. } => "Serialize",
        }
    }

    /// Whether retrying later may succeed (requeue with backoff); otherwise the controller
    /// reports the error and waits for a change of the object.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { source, .. } => match source {
                kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
                _ => true,
            },
            Error::AgentsStillRealize { .. } => true,
            Error::Finalizer { source, .. } => match source.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.is_transient()
                }
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => true,
                finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => false,
            },
            Error::Unnamed { .. } | Error::Serialize { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        let status = kube::core::Status::failure("boom", "Reason").with_code(code);
        Error::Api {
            action: "apply",
            kind: "NodeNetwork",
            name: "n1".into(),
            source: kube::Error::Api(Box::new(status)),
        }
    }

    #[test]
    fn server_errors_and_conflicts_are_transient_client_errors_are_not() {
        assert!(api(500).is_transient());
        assert!(api(409).is_transient());
        assert!(api(429).is_transient());
        assert!(!api(422).is_transient());
        assert!(!api(403).is_transient());
        assert_eq!(api(422).reason(), "Rejected");
        assert_eq!(api(503).reason(), "ApiServerError");
    }

    #[test]
    fn waiting_for_agents_is_transient_and_keeps_its_reason_through_the_finalizer() {
        let e = Error::Finalizer {
            network: "blue".into(),
            source: Box::new(finalizer::Error::CleanupFailed(Error::AgentsStillRealize {
                network: "blue".into(),
                nodes: vec!["n1".into()],
            })),
        };
        assert!(e.is_transient());
        assert_eq!(e.reason(), "WaitingForAgents");
    }
}
