//! Status conditions shared by the Network and PortForward reconcilers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: the spec passed every check.
pub const VALID: &str = weft_crds::constants::CONDITION_VALID;
/// Condition type: the resource is realized.
pub const READY: &str = weft_crds::constants::CONDITION_READY;

/// A condition; `lastTransitionTime` is kept from `previous` when the status did not change.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    previous: &[Condition],
    now: jiff::Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// How many node names a condition's message lists at the most.
pub const NAMES_IN_MESSAGE: usize = 10;

/// `names` for a message: all of them, or the first [`NAMES_IN_MESSAGE`] and how many more
/// (a condition's message stays short at a thousand nodes).
pub fn some_of(names: &[&str]) -> String {
    if names.len() <= NAMES_IN_MESSAGE {
        names.join(", ")
    } else {
        format!(
            "{} and {} more",
            names[..NAMES_IN_MESSAGE].join(", "),
            names.len() - NAMES_IN_MESSAGE
        )
    }
}

/// The condition of `type_` in `conditions`.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `new` reports a different status, reason or message than the `previous` condition
/// of the same type (the moments worth an event).
pub fn changed(previous: &[Condition], new: &Condition) -> bool {
    find(previous, &new.type_).is_none_or(|p| {
        p.status != new.status || p.reason != new.reason || p.message != new.message
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_the_status_stays() {
        let t0 = jiff::Timestamp::from_second(100).unwrap();
        let t1 = jiff::Timestamp::from_second(200).unwrap();
        let first = condition(VALID, true, "Valid", "ok", Some(1), &[], t0);
        let same = condition(
            VALID,
            true,
            "Valid",
            "still ok",
            Some(2),
            std::slice::from_ref(&first),
            t1,
        );
        assert_eq!(same.last_transition_time, Time(t0));
        assert!(changed(std::slice::from_ref(&first), &same));
        let flipped = condition(VALID, false, "Invalid", "bad", Some(3), &[same], t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
    }
}
