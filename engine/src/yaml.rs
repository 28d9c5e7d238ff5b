//! Pipeline files as a tree of YAML nodes that remember where they were written, so
//! every later error (a dangling reference, a wrong type deep inside a stage's params)
//! can name the line and column.
//!
//! Parsing goes through serde-saphyr with budgets: a file that would expand aliases
//! exponentially, nest absurdly deep or is simply huge is refused quickly and in bounded
//! memory instead of being parsed.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;
use serde_saphyr::Spanned;
use std::fmt;

/// Pipeline files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting accepted; real pipelines stay under ten.
pub const MAX_DEPTH: usize = 64;
/// Most YAML values (scalars, lists, mappings, counting what aliases expand to) accepted;
/// a generated 1,000-stage pipeline has about 30,000. Refusing takes ~2 µs per value.
pub const MAX_VALUES: usize = 100_000;

/// A 1-based position in a file; `line == 0` when unknown (e.g. a `--set` value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

impl Loc {
    pub fn is_known(&self) -> bool {
        self.line > 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: NodeValue,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub loc: Loc,
}

/// Why a file could not be read as YAML.
#[derive(Clone, Debug)]
pub struct YamlError {
    pub loc: Loc,
    pub message: String,
}

/// Stack for parsing: deserialising one nesting level takes tens of KB of stack in a
/// debug build (~45 KB measured), so [`MAX_DEPTH`] levels overflow a 2 MB thread (test
/// threads, rayon workers) before the depth budget can refuse the file.
const PARSE_STACK_BYTES: usize = 32 * 1024 * 1024;

/// Parses one YAML document with budgets suited to pipeline files, on a thread whose
/// stack fits [`MAX_DEPTH`] levels whatever the caller's stack is.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("rlhf-yaml".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn_scoped(scope, || parse_here(text));
        match worker {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(YamlError {
                    loc: Loc::default(),
                    message: "the YAML parser failed on this file".to_string(),
                })
            }),
            Err(_) => parse_here(text),
        }
    })
}

fn parse_here(text: &str) -> Result<Node, YamlError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(YamlError {
            loc: Loc::default(),
            message: format!(
                "file is {} bytes; pipeline files are limited to {} bytes",
                text.len(),
                MAX_FILE_BYTES
            ),
        });
    }
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_events: MAX_VALUES,
            max_nodes: MAX_VALUES,
            max_total_scalar_bytes: MAX_FILE_BYTES,
            // Anchored blocks in pipelines are small (shared defaults, a LoRA config).
            max_recorded_anchor_events: 20_000,
            max_recorded_anchor_bytes: MAX_FILE_BYTES,
            max_documents: 1,
        },
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // YAML 1.2 booleans only: `n`, `no`, `off` stay strings (no Norway problem).
        strict_booleans: true,
    };
    let node: Option<Node> = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let loc = e
            .location()
            .map(|l| Loc {
                line: l.line() as u32,
                col: l.column() as u32,
            })
            .unwrap_or_default();
        let options = serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
        };
        YamlError {
            loc,
            message: plain_message(&e)
                .unwrap_or_else(|| first_line(&e.render_with_options(options))),
        }
    })?;
    Ok(node.unwrap_or(Node {
        value: NodeValue::Null,
        loc: Loc { line: 1, col: 1 },
    }))
}

/// Our words for the errors whose library wording names its internals (budget structs,
/// `DuplicateKeyPolicy`) instead of what is wrong with the file.
fn plain_message(error: &serde_saphyr::Error) -> Option<String> {
    let mut inner = error;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    match inner {
        serde_saphyr::Error::DuplicateMappingKey { key, .. } => Some(match key {
            Some(key) => format!("duplicate key `{key}`: each key may appear once in a mapping (stage names must be unique)"),
            None => "duplicate key: each key may appear once in a mapping".to_string(),
        }),
        serde_saphyr::Error::Budget { breach, .. } => Some(budget_message(breach)),
        _ if error.to_string().contains("recursion limit exceeded") => Some(too_deep()),
        _ => None,
    }
}

fn too_deep() -> String {
    format!("refused: lists or mappings nested deeper than {MAX_DEPTH} levels")
}

fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    let name = format!("{breach:?}");
    let name = name
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string();
    match breach {
        B::Depth { .. } => too_deep(),
        B::Documents { .. } => {
            "a pipeline file is one YAML document; this one has another after `---`".to_string()
        }
        _ if name.contains("Alias") || name.contains("Anchor") => {
            "refused: YAML aliases expand to too many values (a \"billion laughs\" file?)"
                .to_string()
        }
        B::Events { .. } | B::Nodes { .. } => {
            format!("refused: more than {MAX_VALUES} YAML values (counting what aliases expand to)")
        }
        _ => format!("refused: the file exceeds the limits for pipeline files ({name})"),
    }
}

fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or(rendered).trim();
    // serde-saphyr prefixes its own position; ours is printed separately.
    match line.find(": ") {
        Some(i) if line[..i].starts_with("line ") || line[..i].starts_with("error at") => {
            line[i + 2..].to_string()
        }
        _ => line.to_string(),
    }
}

impl Node {
    pub fn new(value: NodeValue, loc: Loc) -> Self {
        Node { value, loc }
    }

    /// The value under `key` when this is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            NodeValue::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Follows a dotted path (`lora.r`, `models.1`) and returns the deepest node that
    /// exists on the way, so an error about a missing field still points near it.
    pub fn locate(&self, path: &str) -> &Node {
        let mut node = self;
        for segment in path.split('.').filter(|s| !s.is_empty()) {
            let next = match &node.value {
                NodeValue::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| k.name == segment)
                    .map(|(_, v)| v),
                NodeValue::Seq(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }

    /// The location of the key `name` in this mapping, if present.
    pub fn key_loc(&self, name: &str) -> Option<Loc> {
        match &self.value {
            NodeValue::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.name == name)
                .map(|(k, _)| k.loc),
            _ => None,
        }
    }

    /// What kind of YAML value this is, for "expected a mapping, found a list" errors.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Int(_) | NodeValue::UInt(_) => "an integer",
            NodeValue::Float(_) => "a number",
            NodeValue::String(_) => "a string",
            NodeValue::Seq(_) => "a list",
            NodeValue::Map(_) => "a mapping",
        }
    }

    /// The same value as JSON (what stage params deserialise from).
    pub fn to_json(&self) -> Json {
        match &self.value {
            NodeValue::Null => Json::Null,
            NodeValue::Bool(b) => Json::Bool(*b),
            NodeValue::Int(i) => Json::from(*i),
            NodeValue::UInt(u) => Json::from(*u),
            NodeValue::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
            }
            NodeValue::String(s) => Json::String(s.clone()),
            NodeValue::Seq(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Map(entries) => Json::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Builds a node from JSON, every part at `loc` (for `--set` values).
    pub fn from_json(value: &Json, loc: Loc) -> Node {
        let value = match value {
            Json::Null => NodeValue::Null,
            Json::Bool(b) => NodeValue::Bool(*b),
            Json::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => NodeValue::Int(i),
                (None, Some(u)) => NodeValue::UInt(u),
                _ => NodeValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => NodeValue::String(s.clone()),
            Json::Array(items) => {
                NodeValue::Seq(items.iter().map(|v| Node::from_json(v, loc)).collect())
            }
            Json::Object(map) => NodeValue::Map(
                map.iter()
                    .map(|(k, v)| {
                        (
                            Key {
                                name: k.clone(),
                                loc,
                            },
                            Node::from_json(v, loc),
                        )
                    })
                    .collect(),
            ),
        };
        Node { value, loc }
    }
}

fn loc_of(location: &serde_saphyr::Location) -> Loc {
    Loc {
        line: location.line() as u32,
        col: location.column() as u32,
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Inner>::deserialize(deserializer)?;
        Ok(Node {
            value: spanned.value.0,
            loc: loc_of(&spanned.referenced),
        })
    }
}

/// The value of a node without its location (serde-saphyr's `Spanned` supplies that).
struct Inner(NodeValue);

impl<'de> Deserialize<'de> for Inner {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InnerVisitor).map(Inner)
    }
}

struct InnerVisitor;

impl<'de> Visitor<'de> for InnerVisitor {
    type Value = NodeValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_none<E>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<NodeValue, D::Error> {
        d.deserialize_any(InnerVisitor)
    }
    fn visit_bool<E>(self, v: bool) -> Result<NodeValue, E> {
        Ok(NodeValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<NodeValue, E> {
        Ok(NodeValue::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<NodeValue, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => NodeValue::Int(i),
            Err(_) => NodeValue::UInt(v),
        })
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<NodeValue, E> {
        i64::try_from(v)
            .map(NodeValue::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<NodeValue, E> {
        u64::try_from(v)
            .map(NodeValue::UInt)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<NodeValue, E> {
        Ok(NodeValue::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NodeValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(NodeValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NodeValue, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<Node>()?;
            entries.push((
                Key {
                    name: key.value.0,
                    loc: loc_of(&key.referenced),
                },
                value,
            ));
        }
        Ok(NodeValue::Map(entries))
    }
}

/// A mapping key: any scalar, as text (`1: x` has the key "1").
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Inner::deserialize(deserializer)?.0 {
            NodeValue::String(s) => Ok(KeyText(s)),
            NodeValue::Int(i) => Ok(KeyText(i.to_string())),
            NodeValue::UInt(u) => Ok(KeyText(u.to_string())),
            NodeValue::Float(f) => Ok(KeyText(f.to_string())),
            NodeValue::Bool(b) => Ok(KeyText(b.to_string())),
            NodeValue::Null => Ok(KeyText("null".into())),
            _ => Err(de::Error::custom("mapping keys must be plain scalars")),
        }
    }
}
