//! Conditions as the Kubernetes API conventions define them.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One observation of an aspect of a resource (`Ready`, `Synced`, …).
///
/// Our own type rather than `meta/v1.Condition` so the status schema stays small and
/// the fields carry the bounds the API server wants for cost estimation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type in CamelCase, e.g. `Ready`; unique in the list.
    #[schemars(length(max = 316))]
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// Machine-readable CamelCase reason for the last transition.
    #[schemars(length(max = 1024))]
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The `.metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: Utc::now(),
            observed_generation: generation,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status did not change
/// (the conventions say the time moves only on a transition).
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    if let Some(old) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time;
        }
        *old = new;
    } else {
        conditions.push(new);
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_change() {
        let mut list = vec![];
        let first = Condition::new("Ready", false, "Pending", "", Some(1));
        let t0 = first.last_transition_time;
        set_condition(&mut list, first);
        let mut same = Condition::new("Ready", false, "StillPending", "x", Some(2));
        same.last_transition_time = t0 + chrono::Duration::seconds(5);
        set_condition(&mut list, same);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].last_transition_time, t0);
        assert_eq!(list[0].reason, "StillPending");
        let mut flipped = Condition::new("Ready", true, "Available", "", Some(2));
        flipped.last_transition_time = t0 + chrono::Duration::seconds(9);
        set_condition(&mut list, flipped);
        assert_eq!(
            list[0].last_transition_time,
            t0 + chrono::Duration::seconds(9)
        );
        assert!(find(&list, "Ready").unwrap().is_true());
    }
}
