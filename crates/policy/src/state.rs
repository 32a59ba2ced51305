//! The state decisions build up, and the operations that change it.
//!
//! The state is a JSON object of named maps (`devices`, `overlays`,
//! `containers`, `started_names`, `fragments`, `sandbox`), passed to every rule as `input.state`. Rules never change it:
//! an allowed decision lists operations, and the caller applies them once
//! the action succeeded.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The maps the framework keeps.
pub const MAPS: &[&str] = &["devices", "overlays", "containers", "started_names", "fragments", "sandbox"];

/// The engine's state, as JSON and as the interpreter's value.
///
/// Both are kept in step so that a decision hands the interpreter the state
/// by reference (an `Arc` clone), whatever its size, instead of converting
/// it every time.
#[derive(Debug, Clone)]
pub struct State {
    json: Map<String, Value>,
    rego: regorus::Value,
}

impl Default for State {
    fn default() -> Self {
        Self { json: Map::new(), rego: regorus::Value::new_object() }
    }
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json
    }
}

impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = Map::<String, Value>::deserialize(deserializer)?;
        let rego = to_rego(&Value::Object(json.clone())).map_err(serde::de::Error::custom)?;
        Ok(Self { json, rego })
    }
}

/// JSON to the interpreter's value, without going through text.
pub(crate) fn to_rego(value: &Value) -> Result<regorus::Value, serde_json::Error> {
    regorus::Value::deserialize(value)
}

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
    /// The map (one of [`MAPS`]).
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
        Value::Object(self.json.clone())
    }

    /// The state as the interpreter's value (cheap to clone).
    pub(crate) fn rego(&self) -> &regorus::Value {
        &self.rego
    }

    /// One entry of one map.
    pub fn get(&self, map: &str, key: &str) -> Option<&Value> {
        self.json.get(map)?.get(key)
    }

    /// Apply operations, all or none. The operations are checked first
    /// against the state as the earlier operations of the same batch leave
    /// it, then applied in place: the cost is that of the operations, not of
    /// the state's size.
    pub fn apply(&mut self, ops: &[MetadataOp]) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        // (map, key) -> present after the operations checked so far.
        let mut batch: Vec<(&str, &str, bool)> = Vec::with_capacity(ops.len());
        let mut values = Vec::with_capacity(ops.len());
        for op in ops {
            if !MAPS.contains(&op.name.as_str()) {
                return Err(StateError::UnknownMap(op.name.clone()));
            }
            let present = batch
                .iter()
                .rev()
                .find(|(map, key, _)| *map == op.name && *key == op.key)
                .map(|(_, _, present)| *present)
                .unwrap_or_else(|| self.get(&op.name, &op.key).is_some());
            let (name, key) = (op.name.clone(), op.key.clone());
            let value = match op.action {
                Action::Add if present => return Err(StateError::Exists { map: name, key }),
                Action::Update | Action::Remove if !present => return Err(StateError::Missing { map: name, key }),
                Action::Add | Action::Update => {
                    let value = op.value.as_ref().ok_or(StateError::NoValue { map: name.clone(), key: key.clone() })?;
                    let converted = to_rego(value).map_err(|_| StateError::NoValue { map: name, key })?;
                    Some((value.clone(), converted))
                }
                Action::Remove => None,
            };
            batch.push((&op.name, &op.key, value.is_some()));
            values.push(value);
        }
        for (op, value) in ops.iter().zip(values) {
            let json = self.json.entry(op.name.clone()).or_insert_with(|| Value::Object(Map::new()));
            let rego = rego_map(&mut self.rego, &op.name);
            match (value, json, rego) {
                (Some((value, converted)), Value::Object(json), Ok(rego)) => {
                    json.insert(op.key.clone(), value);
                    rego.insert(regorus::Value::from(op.key.as_str()), converted);
                }
                (None, Value::Object(json), Ok(rego)) => {
                    json.remove(&op.key);
                    rego.remove(&regorus::Value::from(op.key.as_str()));
                }
                // The maps are objects by construction (MAPS only).
                _ => return Err(StateError::UnknownMap(op.name.clone())),
            }
        }
        Ok(())
    }
}

/// The named map inside the state value, created empty when missing.
fn rego_map<'a>(state: &'a mut regorus::Value, name: &str) -> Result<&'a mut regorus::value::Object, StateError> {
    let unknown = || StateError::UnknownMap(name.to_string());
    let root = state.as_object_mut().map_err(|_| unknown())?;
    let key = regorus::Value::from(name);
    if !root.contains_key(&key) {
        root.insert(key.clone(), regorus::Value::new_object());
    }
    root.get_mut(&key).and_then(|map| map.as_object_mut().ok()).ok_or_else(unknown)
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
    fn the_interpreter_value_follows_the_json() {
        let mut state = State::default();
        state
            .apply(&[op(Action::Add, "/a", Some(json!({"x": [1, 2]}))), op(Action::Add, "/b", Some(json!("h")))])
            .unwrap();
        state.apply(&[op(Action::Remove, "/b", None)]).unwrap();
        let back: Value = serde_json::to_value(state.rego()).unwrap();
        assert_eq!(back, state.to_json());
        let parsed: State = serde_json::from_value(state.to_json()).unwrap();
        assert_eq!(serde_json::to_value(parsed.rego()).unwrap(), state.to_json());
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
