//! The state decisions build up, and the operations that change it.
//!
//! The state is a JSON object of named maps (`devices`, `overlays`,
//! `started`), passed to every rule as `input.state`. Rules never change it:
//! an allowed decision lists operations, and the caller applies them once
//! the action succeeded.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The maps the framework keeps.
pub const MAPS: &[&str] = &["devices", "overlays", "started"];

/// The engine's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct State(Map<String, Value>);

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Add a key that must not exist.
    Add,
    /// Replace the value of a key that must exist.
    Update,
    /// Remove a key that must exist.
    Remove,
}

/// One state change, as a rule returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataOp {
    /// The map (`devices`, `overlays`, `started`).
    pub name: String,
    /// What to do.
    pub action: Action,
    /// The key in the map.
    pub key: String,
    /// The value for add and update.
    #[serde(default)]
    pub value: Option<Value>,
}

/// A rule asked for a state change that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The map is not one the framework keeps.
    #[error("unknown state map {0:?}")]
    UnknownMap(String),
    /// Add of a key that exists.
    #[error("{map}[{key:?}] already exists")]
    Exists {
        /// The map.
        map: String,
        /// The key.
        key: String,
    },
    /// Update or remove of a key that does not exist.
    #[error("{map}[{key:?}] does not exist")]
    Missing {
        /// The map.
        map: String,
        /// The key.
        key: String,
    },
    /// Add or update without a value.
    #[error("{map}[{key:?}]: add and update need a value")]
    NoValue {
        /// The map.
        map: String,
        /// The key.
        key: String,
    },
}

impl State {
    /// The state as the JSON object rules see.
    pub fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// One entry of one map.
    pub fn get(&self, map: &str, key: &str) -> Option<&Value> {
        self.0.get(map)?.get(key)
    }

    /// Apply operations, all or none.
    pub fn apply(&mut self, ops: &[MetadataOp]) -> Result<(), StateError> {
        let mut next = self.0.clone();
        for op in ops {
            if !MAPS.contains(&op.name.as_str()) {
                return Err(StateError::UnknownMap(op.name.clone()));
            }
            let map = next.entry(op.name.clone()).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(map) = map else {
                return Err(StateError::UnknownMap(op.name.clone()));
            };
            let (name, key) = (op.name.clone(), op.key.clone());
            match op.action {
                Action::Add if map.contains_key(&op.key) => return Err(StateError::Exists { map: name, key }),
                Action::Update | Action::Remove if !map.contains_key(&op.key) => {
                    return Err(StateError::Missing { map: name, key });
                }
                Action::Add | Action::Update => {
                    let value = op.value.clone().ok_or(StateError::NoValue { map: name, key })?;
                    map.insert(op.key.clone(), value);
                }
                Action::Remove => {
                    map.remove(&op.key);
                }
            }
        }
        self.0 = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(action: Action, key: &str, value: Option<Value>) -> MetadataOp {
        MetadataOp { name: "devices".into(), action, key: key.into(), value }
    }

    #[test]
    fn add_update_remove() {
        let mut state = State::default();
        state.apply(&[op(Action::Add, "/a", Some(json!("h1")))]).unwrap();
        assert_eq!(state.get("devices", "/a"), Some(&json!("h1")));
        state.apply(&[op(Action::Update, "/a", Some(json!("h2")))]).unwrap();
        state.apply(&[op(Action::Remove, "/a", None)]).unwrap();
        assert_eq!(state.get("devices", "/a"), None);
    }

    #[test]
    fn all_or_nothing() {
        let mut state = State::default();
        let err = state.apply(&[op(Action::Add, "/a", Some(json!("h"))), op(Action::Remove, "/b", None)]).unwrap_err();
        assert_eq!(err, StateError::Missing { map: "devices".into(), key: "/b".into() });
        assert_eq!(state, State::default());
        state.apply(&[op(Action::Add, "/a", Some(json!("h")))]).unwrap();
        assert!(matches!(state.apply(&[op(Action::Add, "/a", Some(json!("h")))]), Err(StateError::Exists { .. })));
        let bad = MetadataOp { name: "root".into(), action: Action::Add, key: "k".into(), value: Some(json!(1)) };
        assert_eq!(state.apply(&[bad]), Err(StateError::UnknownMap("root".into())));
    }
}
