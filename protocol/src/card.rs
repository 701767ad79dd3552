//! The A2A agent-card model: what an agent says it can do, parsed and bounded.
//!
//! An agent publishes an *agent card* (JSON) naming itself and its skills; the gateway routes by
//! skill id, so skill ids are our *capability names*. This module reads cards as real agents
//! publish them today, in both shapes of the A2A specification:
//!
//! * **v0.3**: top-level `url`, `preferredTransport`, `protocolVersion` and an optional
//!   `additionalInterfaces` list of `{url, transport}`;
//! * **v1.0**: a `supportedInterfaces` list of `{url, protocolBinding, protocolVersion}`.
//!
//! Both shapes land in one [`AgentCard`]. Unknown fields are ignored so that newer cards still
//! parse. Everything else is checked: the input size, every field's type, string lengths, list
//! lengths and the syntax and uniqueness of capability names, and every error names the offending
//! field with a JSON path such as `skills[2].tags[1]`.
//!
//! What this module does not do: fetch cards, check URLs for reachability, or interpret the
//! `capabilities`, `securitySchemes` or `extensions` objects (they are ignored).
//!
//! Optional fields that are present but `null` are treated as absent, because several card
//! generators serialise unset optional fields as `null`.

use std::collections::HashMap;

use serde_json::{Map, Value};
use thiserror::Error;

/// Largest card accepted by [`AgentCard::from_json`], in bytes.
pub const MAX_CARD_BYTES: usize = 64 * 1024;
/// Most skills one card may declare.
pub const MAX_SKILLS: usize = 256;
/// Longest capability name (skill id), in bytes of UTF-8.
pub const MAX_CAPABILITY_NAME_BYTES: usize = 255;
/// Most tags one skill may carry.
pub const MAX_TAGS_PER_SKILL: usize = 32;
/// Most examples one skill may carry.
pub const MAX_EXAMPLES_PER_SKILL: usize = 32;
/// Most entries in any list of media types (`defaultInputModes`, a skill's `inputModes`, ...).
pub const MAX_MODES: usize = 32;
/// Most interfaces one card may list.
pub const MAX_INTERFACES: usize = 32;
/// Longest string accepted anywhere in a card (names, descriptions, tags, modes, URLs), in bytes.
pub const MAX_STRING_BYTES: usize = 4096;

/// The v1.0 list of interfaces.
const V1_INTERFACES: &str = "supportedInterfaces";
/// The v0.3 list of interfaces besides the main `url`.
const V03_INTERFACES: &str = "additionalInterfaces";

/// Why an agent card was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CardError {
    /// The card is larger than [`MAX_CARD_BYTES`].
    #[error("card is {len} bytes, the limit is {limit}")]
    TooLarge {
        /// Size of the rejected card in bytes.
        len: usize,
        /// The limit it exceeded.
        limit: usize,
    },
    /// The bytes are not valid JSON (or not UTF-8).
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the JSON parser objected to.
        message: String,
    },
    /// A field is missing, has the wrong type or holds an invalid value.
    #[error("{path}: {problem}")]
    Field {
        /// JSON path of the field, e.g. `skills[0].id` (`$` for the whole document).
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A list holds more entries than its limit.
    #[error("{path}: more than {limit} entries")]
    TooMany {
        /// JSON path of the list.
        path: String,
        /// The limit it exceeded.
        limit: usize,
    },
    /// Two skills share one id, which would make routing by capability ambiguous.
    #[error("skills[{second}].id: duplicate skill id {id:?} (already used by skills[{first}])")]
    DuplicateSkill {
        /// The repeated skill id.
        id: String,
        /// Index of the first skill with this id.
        first: usize,
        /// Index of the skill repeating it.
        second: usize,
    },
    /// A capability name given to [`validate_capability_name`] is invalid.
    #[error("invalid capability name {name:?}: {problem}")]
    CapabilityName {
        /// The rejected name (cut to its first 64 bytes if longer).
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// An agent card: who an agent is, where it listens and which skills (capabilities) it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCard {
    /// Human-readable agent name; never empty.
    pub name: String,
    /// Human-readable description (empty if the card had none).
    pub description: String,
    /// The agent's own version string (empty if the card had none).
    pub version: String,
    /// v0.3 `url`: the agent's main endpoint.
    pub url: Option<String>,
    /// v0.3 `preferredTransport` of the main endpoint, e.g. `JSONRPC`.
    pub preferred_transport: Option<String>,
    /// v0.3 `protocolVersion`: the A2A version the card speaks.
    pub protocol_version: Option<String>,
    /// v1.0 `supportedInterfaces`, or else v0.3 `additionalInterfaces`.
    pub interfaces: Vec<AgentInterface>,
    /// Media types the agent accepts unless a skill says otherwise.
    pub default_input_modes: Vec<String>,
    /// Media types the agent produces unless a skill says otherwise.
    pub default_output_modes: Vec<String>,
    /// The agent's skills; at least one, ids unique.
    pub skills: Vec<Skill>,
}

/// One endpoint of an agent: a URL and the protocol binding spoken there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInterface {
    /// Endpoint URL.
    pub url: String,
    /// Protocol binding, e.g. `JSONRPC`, `GRPC`, `HTTP+JSON` (v0.3 calls it `transport`).
    pub protocol_binding: String,
    /// A2A protocol version spoken at this endpoint (v1.0 only).
    pub protocol_version: Option<String>,
}

/// One skill of an agent; its `id` is the capability name the gateway routes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    /// Capability name: see [`validate_capability_name`].
    pub id: String,
    /// Human-readable skill name; never empty.
    pub name: String,
    /// Human-readable description (empty if the card had none).
    pub description: String,
    /// Free-form keywords.
    pub tags: Vec<String>,
    /// Example requests.
    pub examples: Vec<String>,
    /// Accepted media types; empty means the card's default (see [`Skill::effective_input_modes`]).
    pub input_modes: Vec<String>,
    /// Produced media types; empty means the card's default.
    pub output_modes: Vec<String>,
}

impl AgentCard {
    /// Parses and validates a card published as JSON (v0.3 or v1.0 shape).
    ///
    /// Rejects cards larger than [`MAX_CARD_BYTES`] before parsing them.
    pub fn from_json(bytes: &[u8]) -> Result<AgentCard, CardError> {
        if bytes.len() > MAX_CARD_BYTES {
            return Err(CardError::TooLarge {
                len: bytes.len(),
                limit: MAX_CARD_BYTES,
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let (card, interfaces_key) = card_from_value(&value)?;
        card.check_contents(interfaces_key)?;
        Ok(card)
    }

    /// Serialises the card as v1.0-shaped JSON (`supportedInterfaces`), which
    /// [`AgentCard::from_json`] reads back to an equal card.
    ///
    /// The v0.3 fields `url`, `preferredTransport` and `protocolVersion` are written too when set,
    /// so nothing is lost; v1.0 readers ignore them.
    pub fn to_json(&self) -> Vec<u8> {
        let mut card = Map::new();
        card.insert("name".into(), Value::from(self.name.as_str()));
        card.insert("description".into(), Value::from(self.description.as_str()));
        card.insert("version".into(), Value::from(self.version.as_str()));
        if let Some(url) = &self.url {
            card.insert("url".into(), Value::from(url.as_str()));
        }
        if let Some(transport) = &self.preferred_transport {
            card.insert("preferredTransport".into(), Value::from(transport.as_str()));
        }
        if let Some(version) = &self.protocol_version {
            card.insert("protocolVersion".into(), Value::from(version.as_str()));
        }
        let interfaces = self.interfaces.iter().map(interface_to_value).collect();
        card.insert("supportedInterfaces".into(), Value::Array(interfaces));
        card.insert(
            "defaultInputModes".into(),
            strings_to_value(&self.default_input_modes),
        );
        card.insert(
            "defaultOutputModes".into(),
            strings_to_value(&self.default_output_modes),
        );
        let skills = self.skills.iter().map(skill_to_value).collect();
        card.insert("skills".into(), Value::Array(skills));
        // `Value`'s Display is infallible (keys are always strings), unlike `to_vec`'s signature.
        Value::Object(card).to_string().into_bytes()
    }

    /// A card with the given name, description and version, no interfaces, no default modes and
    /// no skills yet (add them with [`AgentCard::with_skill`]).
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        version: impl Into<String>,
    ) -> Self {
        AgentCard {
            name: name.into(),
            description: description.into(),
            version: version.into(),
            url: None,
            preferred_transport: None,
            protocol_version: None,
            interfaces: Vec::new(),
            default_input_modes: Vec::new(),
            default_output_modes: Vec::new(),
            skills: Vec::new(),
        }
    }

    /// Appends a skill.
    pub fn with_skill(mut self, skill: Skill) -> Self {
        self.skills.push(skill);
        self
    }

    /// Appends an interface.
    pub fn with_interface(mut self, interface: AgentInterface) -> Self {
        self.interfaces.push(interface);
        self
    }

    /// Sets the card's default input and output media types.
    pub fn with_default_modes(mut self, input: Vec<String>, output: Vec<String>) -> Self {
        self.default_input_modes = input;
        self.default_output_modes = output;
        self
    }

    /// The capability names (skill ids) the agent offers, in card order.
    pub fn capabilities(&self) -> impl Iterator<Item = &str> {
        self.skills.iter().map(|skill| skill.id.as_str())
    }

    /// Checks a card built in code against the rules [`AgentCard::from_json`] enforces, including
    /// that its JSON form fits in [`MAX_CARD_BYTES`].
    pub fn validate(&self) -> Result<(), CardError> {
        self.check_contents(V1_INTERFACES)?;
        let len = self.to_json().len();
        if len > MAX_CARD_BYTES {
            return Err(CardError::TooLarge {
                len,
                limit: MAX_CARD_BYTES,
            });
        }
        Ok(())
    }

    /// The rules on values shared by parsing and [`AgentCard::validate`]; types are already
    /// guaranteed by the Rust fields. `interfaces_key` names the list the interfaces came from,
    /// for error paths.
    fn check_contents(&self, interfaces_key: &str) -> Result<(), CardError> {
        check_string("name", &self.name, true)?;
        check_string("description", &self.description, false)?;
        check_string("version", &self.version, false)?;
        check_optional_string("url", self.url.as_deref())?;
        check_optional_string("preferredTransport", self.preferred_transport.as_deref())?;
        check_optional_string("protocolVersion", self.protocol_version.as_deref())?;
        check_count(interfaces_key, self.interfaces.len(), MAX_INTERFACES)?;
        for (i, interface) in self.interfaces.iter().enumerate() {
            let path = format!("{interfaces_key}[{i}]");
            check_string(&format!("{path}.url"), &interface.url, true)?;
            let binding_key = if interfaces_key == V03_INTERFACES {
                "transport"
            } else {
                "protocolBinding"
            };
            check_string(
                &format!("{path}.{binding_key}"),
                &interface.protocol_binding,
                true,
            )?;
            check_optional_string(
                &format!("{path}.protocolVersion"),
                interface.protocol_version.as_deref(),
            )?;
        }
        check_strings("defaultInputModes", &self.default_input_modes, MAX_MODES)?;
        check_strings("defaultOutputModes", &self.default_output_modes, MAX_MODES)?;
        if self.skills.is_empty() {
            return Err(field(
                "skills",
                "must list at least one skill (an agent without capabilities cannot be routed to)",
            ));
        }
        check_count("skills", self.skills.len(), MAX_SKILLS)?;
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.skills.len());
        for (i, skill) in self.skills.iter().enumerate() {
            skill.check_contents(&format!("skills[{i}]"))?;
            if let Some(&first) = seen.get(skill.id.as_str()) {
                return Err(CardError::DuplicateSkill {
                    id: skill.id.clone(),
                    first,
                    second: i,
                });
            }
            seen.insert(&skill.id, i);
        }
        Ok(())
    }
}

impl Skill {
    /// A skill with the given id (capability name) and display name, and nothing else.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Skill {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            tags: Vec::new(),
            examples: Vec::new(),
            input_modes: Vec::new(),
            output_modes: Vec::new(),
        }
    }

    /// Sets the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the tags.
    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the examples.
    pub fn with_examples<I, S>(mut self, examples: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.examples = examples.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the accepted media types (overriding the card's default).
    pub fn with_input_modes<I, S>(mut self, modes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.input_modes = modes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the produced media types (overriding the card's default).
    pub fn with_output_modes<I, S>(mut self, modes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.output_modes = modes.into_iter().map(Into::into).collect();
        self
    }

    /// The media types this skill accepts: its own if it lists any, else the card's default.
    pub fn effective_input_modes<'a>(&'a self, card: &'a AgentCard) -> &'a [String] {
        if self.input_modes.is_empty() {
            &card.default_input_modes
        } else {
            &self.input_modes
        }
    }

    /// The media types this skill produces: its own if it lists any, else the card's default.
    pub fn effective_output_modes<'a>(&'a self, card: &'a AgentCard) -> &'a [String] {
        if self.output_modes.is_empty() {
            &card.default_output_modes
        } else {
            &self.output_modes
        }
    }

    fn check_contents(&self, path: &str) -> Result<(), CardError> {
        if let Some(problem) = capability_name_problem(&self.id) {
            return Err(field(&format!("{path}.id"), problem));
        }
        check_string(&format!("{path}.name"), &self.name, true)?;
        check_string(&format!("{path}.description"), &self.description, false)?;
        check_strings(&format!("{path}.tags"), &self.tags, MAX_TAGS_PER_SKILL)?;
        check_strings(
            &format!("{path}.examples"),
            &self.examples,
            MAX_EXAMPLES_PER_SKILL,
        )?;
        check_strings(&format!("{path}.inputModes"), &self.input_modes, MAX_MODES)?;
        check_strings(
            &format!("{path}.outputModes"),
            &self.output_modes,
            MAX_MODES,
        )
    }
}

/// Checks a capability name (skill id): 1 to [`MAX_CAPABILITY_NAME_BYTES`] bytes of UTF-8, with
/// no ASCII control characters and no whitespace.
pub fn validate_capability_name(name: &str) -> Result<(), CardError> {
    match capability_name_problem(name) {
        None => Ok(()),
        Some(problem) => Err(CardError::CapabilityName {
            name: truncate(name, 64).to_owned(),
            problem,
        }),
    }
}

fn capability_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if name.len() > MAX_CAPABILITY_NAME_BYTES {
        return Some(format!(
            "is {} bytes long, the limit is {MAX_CAPABILITY_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|(_, c)| c.is_ascii_control() || c.is_whitespace())
    {
        let kind = if c.is_ascii_control() {
            "a control character"
        } else {
            "whitespace"
        };
        return Some(format!("contains {kind} ({c:?}) at byte {at}"));
    }
    None
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn field(path: &str, problem: impl Into<String>) -> CardError {
    CardError::Field {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn check_string(path: &str, value: &str, required_non_empty: bool) -> Result<(), CardError> {
    if required_non_empty && value.is_empty() {
        return Err(field(path, "must not be empty"));
    }
    if value.len() > MAX_STRING_BYTES {
        return Err(field(
            path,
            format!(
                "is {} bytes long, the limit is {MAX_STRING_BYTES}",
                value.len()
            ),
        ));
    }
    Ok(())
}

fn check_optional_string(path: &str, value: Option<&str>) -> Result<(), CardError> {
    value.map_or(Ok(()), |value| check_string(path, value, false))
}

fn check_count(path: &str, len: usize, limit: usize) -> Result<(), CardError> {
    if len > limit {
        return Err(CardError::TooMany {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(())
}

fn check_strings(path: &str, values: &[String], limit: usize) -> Result<(), CardError> {
    check_count(path, values.len(), limit)?;
    for (i, value) in values.iter().enumerate() {
        check_string(&format!("{path}[{i}]"), value, false)?;
    }
    Ok(())
}

fn json_error(error: serde_json::Error) -> CardError {
    let full = error.to_string();
    // serde_json appends " at line L column C" to its message; we report those separately.
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    CardError::Json {
        line: error.line(),
        column: error.column(),
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a `serde_json::Value` into the model: types and presence only; value rules are
// checked afterwards by `check_contents`, shared with `validate`.

/// Reads the card's fields in document order; also returns the key the interfaces came from.
fn card_from_value(value: &Value) -> Result<(AgentCard, &'static str), CardError> {
    let obj = Obj::new("$", value)?;
    let name = obj.string("name")?;
    let description = obj.optional_string("description")?.unwrap_or_default();
    let version = obj.optional_string("version")?.unwrap_or_default();
    let url = obj.optional_string("url")?;
    let preferred_transport = obj.optional_string("preferredTransport")?;
    let protocol_version = obj.optional_string("protocolVersion")?;
    let (interfaces, interfaces_key) = if let Some(list) = obj.optional(V1_INTERFACES) {
        let interfaces = obj.list(V1_INTERFACES, list, MAX_INTERFACES, |path, v| {
            let o = Obj::new(path, v)?;
            Ok(AgentInterface {
                url: o.string("url")?,
                protocol_binding: o.string("protocolBinding")?,
                protocol_version: o.optional_string("protocolVersion")?,
            })
        })?;
        (interfaces, V1_INTERFACES)
    } else if let Some(list) = obj.optional(V03_INTERFACES) {
        let interfaces = obj.list(V03_INTERFACES, list, MAX_INTERFACES, |path, v| {
            let o = Obj::new(path, v)?;
            Ok(AgentInterface {
                url: o.string("url")?,
                protocol_binding: o.string("transport")?,
                protocol_version: None,
            })
        })?;
        (interfaces, V03_INTERFACES)
    } else {
        (Vec::new(), V1_INTERFACES)
    };
    let default_input_modes = obj.optional_strings("defaultInputModes", MAX_MODES)?;
    let default_output_modes = obj.optional_strings("defaultOutputModes", MAX_MODES)?;
    let skills = match obj.optional("skills") {
        Some(list) => obj.list("skills", list, MAX_SKILLS, skill_from_value)?,
        None => return Err(field("skills", "missing")),
    };
    let card = AgentCard {
        name,
        description,
        version,
        url,
        preferred_transport,
        protocol_version,
        interfaces,
        default_input_modes,
        default_output_modes,
        skills,
    };
    Ok((card, interfaces_key))
}

fn skill_from_value(path: &str, value: &Value) -> Result<Skill, CardError> {
    let o = Obj::new(path, value)?;
    Ok(Skill {
        id: o.string("id")?,
        name: o.string("name")?,
        description: o.optional_string("description")?.unwrap_or_default(),
        tags: o.optional_strings("tags", MAX_TAGS_PER_SKILL)?,
        examples: o.optional_strings("examples", MAX_EXAMPLES_PER_SKILL)?,
        input_modes: o.optional_strings("inputModes", MAX_MODES)?,
        output_modes: o.optional_strings("outputModes", MAX_MODES)?,
    })
}

/// A JSON object together with its path, for error messages.
struct Obj<'a> {
    path: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(path: &'a str, value: &'a Value) -> Result<Self, CardError> {
        match value {
            Value::Object(map) => Ok(Obj { path, map }),
            other => Err(field(path, expected("an object", other))),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path == "$" {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value under `key`, treating `null` as absent.
    fn optional(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String, CardError> {
        match self.map.get(key) {
            None => Err(field(&self.child_path(key), "missing")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(field(&self.child_path(key), expected("a string", other))),
        }
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>, CardError> {
        match self.optional(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(field(&self.child_path(key), expected("a string", other))),
        }
    }

    fn optional_strings(&self, key: &str, limit: usize) -> Result<Vec<String>, CardError> {
        match self.optional(key) {
            None => Ok(Vec::new()),
            Some(list) => self.list(key, list, limit, |path, v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(field(path, expected("a string", other))),
            }),
        }
    }

    /// Reads the array `value` (found under `key`) with `item`, checking its length first.
    fn list<T>(
        &self,
        key: &str,
        value: &Value,
        limit: usize,
        item: impl Fn(&str, &Value) -> Result<T, CardError>,
    ) -> Result<Vec<T>, CardError> {
        let path = self.child_path(key);
        let items = match value {
            Value::Array(items) => items,
            other => return Err(field(&path, expected("an array", other))),
        };
        check_count(&path, items.len(), limit)?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| item(&format!("{path}[{i}]"), v))
            .collect()
    }
}

fn expected(what: &str, found: &Value) -> String {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    format!("expected {what}, found {kind}")
}

fn strings_to_value(values: &[String]) -> Value {
    Value::Array(values.iter().map(|s| Value::from(s.as_str())).collect())
}

fn interface_to_value(interface: &AgentInterface) -> Value {
    let mut obj = Map::new();
    obj.insert("url".into(), Value::from(interface.url.as_str()));
    obj.insert(
        "protocolBinding".into(),
        Value::from(interface.protocol_binding.as_str()),
    );
    if let Some(version) = &interface.protocol_version {
        obj.insert("protocolVersion".into(), Value::from(version.as_str()));
    }
    Value::Object(obj)
}

fn skill_to_value(skill: &Skill) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), Value::from(skill.id.as_str()));
    obj.insert("name".into(), Value::from(skill.name.as_str()));
    obj.insert(
        "description".into(),
        Value::from(skill.description.as_str()),
    );
    obj.insert("tags".into(), strings_to_value(&skill.tags));
    if !skill.examples.is_empty() {
        obj.insert("examples".into(), strings_to_value(&skill.examples));
    }
    if !skill.input_modes.is_empty() {
        obj.insert("inputModes".into(), strings_to_value(&skill.input_modes));
    }
    if !skill.output_modes.is_empty() {
        obj.insert("outputModes".into(), strings_to_value(&skill.output_modes));
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        AgentCard::from_json(json.as_bytes())
            .expect_err("card should be rejected")
            .to_string()
    }

    const MINIMAL: &str = r#"{"name":"a","skills":[{"id":"x","name":"X"}]}"#;

    #[test]
    fn minimal_card_defaults() {
        let card = AgentCard::from_json(MINIMAL.as_bytes()).unwrap();
        assert_eq!(card.description, "");
        assert_eq!(card.version, "");
        assert!(card.interfaces.is_empty());
        assert_eq!(card.capabilities().collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn root_must_be_object() {
        assert_eq!(err("[]"), "$: expected an object, found array");
    }

    #[test]
    fn null_optional_is_absent_but_null_required_is_not() {
        let card =
            AgentCard::from_json(br#"{"name":"a","url":null,"skills":[{"id":"x","name":"X"}]}"#)
                .unwrap();
        assert_eq!(card.url, None);
        assert_eq!(
            err(r#"{"name":null,"skills":[{"id":"x","name":"X"}]}"#),
            "name: expected a string, found null"
        );
    }

    #[test]
    fn capability_names() {
        assert!(validate_capability_name("book_air_tickets").is_ok());
        assert!(validate_capability_name("currency.convert/v2").is_ok());
        assert!(validate_capability_name("übersetzen").is_ok());
        assert!(validate_capability_name(&"a".repeat(255)).is_ok());
        assert!(validate_capability_name("").is_err());
        assert!(validate_capability_name(&"a".repeat(256)).is_err());
        assert!(validate_capability_name("a b").is_err());
        assert!(validate_capability_name("a\u{7f}").is_err());
        assert!(validate_capability_name("a\u{a0}b").is_err());
        let long = validate_capability_name(&"é".repeat(200)).unwrap_err();
        match long {
            CardError::CapabilityName { name, .. } => assert!(name.len() <= 64),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn json_error_has_position() {
        match AgentCard::from_json(b"{\n  \"name\": }").unwrap_err() {
            CardError::Json { line, column, .. } => assert_eq!((line, column), (2, 11)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn v03_additional_interfaces() {
        let card = AgentCard::from_json(
            br#"{"name":"a","url":"http://h/","preferredTransport":"JSONRPC",
                "additionalInterfaces":[{"url":"http://h/grpc","transport":"GRPC"}],
                "skills":[{"id":"x","name":"X"}]}"#,
        )
        .unwrap();
        assert_eq!(
            card.interfaces,
            [AgentInterface {
                url: "http://h/grpc".into(),
                protocol_binding: "GRPC".into(),
                protocol_version: None,
            }]
        );
        assert_eq!(
            err(r#"{"name":"a","additionalInterfaces":[{"url":"u"}],"skills":[]}"#),
            "additionalInterfaces[0].transport: missing"
        );
    }

    #[test]
    fn validate_checks_built_cards() {
        let card = AgentCard::new("n", "d", "1");
        assert!(matches!(
            card.validate(),
            Err(CardError::Field { ref path, .. }) if path == "skills"
        ));
        let card = card
            .with_skill(Skill::new("a", "A"))
            .with_skill(Skill::new("a", "B"));
        assert_eq!(
            card.validate().unwrap_err(),
            CardError::DuplicateSkill {
                id: "a".into(),
                first: 0,
                second: 1
            }
        );
    }

    #[test]
    fn card_that_is_not_utf8_is_a_json_error() {
        // docs/PROTOCOL.md section 5.3: a card that is not UTF-8 gets the "Not JSON" reason.
        let reason = |bytes: &[u8]| AgentCard::from_json(bytes).unwrap_err().to_string();
        assert_eq!(
            reason(b"{\"name\":\"a\xff\",\"skills\":[]}"),
            "invalid JSON at line 1, column 11: invalid unicode code point"
        );
        assert_eq!(
            reason(b"\xff{}"),
            "invalid JSON at line 1, column 1: expected value"
        );
        // A UTF-8 byte order mark is not accepted either.
        assert_eq!(
            reason(b"\xef\xbb\xbf{}"),
            "invalid JSON at line 1, column 1: expected value"
        );
    }
}
