//! Reading one inference event exactly as `genmon.schemas.events.InferenceEvent` would.
//!
//! Accepts a subset of what pydantic accepts and returns `None` for everything else, so
//! that the Python validator decides (and names the reason of) every other message:
//! - `request_id` and `started_at` must be present (their defaults are generated);
//! - `null` only where the schema allows `None`;
//! - numbers as JSON numbers, counts as JSON integers (no numeric strings, no `5.0`);
//! - timestamps as `YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM|-HH:MM)`, years 1970-2200;
//! - no duplicate keys, no unknown keys, strings valid UTF-8 without lone surrogates;
//! - `messages`: at most `MAX_MESSAGES` objects of exactly `role` (one of `ROLES`) and
//!   `content` (free text, bounded as `prompt`);
//! - no NUL in any string, metadata included. NUL and lone surrogates are text PostgreSQL
//!   cannot store: the Python validator refuses them in identifiers and replaces them by
//!   U+FFFD in free text, and counts the events it changed, so it sees every such event
//!   (its canonical form, with U+FFFD, is then read here).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::quality::{Quality, Signals};

const MAX_TEXT_CHARS: usize = 32_768;
const MAX_ID_CHARS: usize = 256;
const MAX_ATTRIBUTES: usize = 32;
const MAX_ATTRIBUTE_KEY_CHARS: usize = 64;
const MAX_ATTRIBUTE_VALUE_CHARS: usize = 256;
const MAX_METADATA_KEYS: usize = 64;
const MAX_ERROR_CODE_CHARS: usize = 128;
const MAX_MS: f64 = 86_400_000.0;
const MAX_TOKENS: u64 = 10_000_000;
const MAX_MESSAGES: usize = 256;
/// `ChatMessage.role` values.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// `InferenceStatus` values; an event's status is an index into this.
pub const STATUSES: [&str; 6] = [
    "ok",
    "error",
    "timeout",
    "cancelled",
    "content_filtered",
    "truncated",
];
const FINISH_REASONS: [&str; 5] = ["stop", "length", "content_filter", "tool_calls", "other"];

/// An accepted inference event with its quality signals.
pub struct Event {
    pub partition: i64,
    pub offset: i64,
    pub raw_index: usize,
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub t_ms: i64,
    pub prompt: String,
    pub response: String,
    /// Chat turns `(role, content)`, when the event carries `messages`.
    pub messages: Option<Vec<(&'static str, String)>>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub status: usize,
    pub error_code: Option<String>,
    pub truncated: bool,
    /// Attributes in their JSON order (as the pydantic dict keeps them) and sorted by key.
    pub segment: Vec<(String, String)>,
    pub sorted_segment: Vec<(String, String)>,
    pub subject_id: Option<String>,
    pub signals: Signals,
}

impl Event {
    pub fn is_error(&self) -> bool {
        self.status == 1 || self.status == 2
    }
}

/// A field that may be absent but not `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    #[serde(default, deserialize_with = "present")]
    schema_version: Option<u64>,
    #[serde(default, borrow, deserialize_with = "present")]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model_id: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    model_version: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    started_at: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finished_at: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    prompt: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    response: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    messages: Option<Messages<'a>>,
    latency_ms: f64,
    #[serde(default)]
    time_to_first_token_ms: Option<f64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default, borrow, deserialize_with = "present")]
    status: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    error_code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    segment: Option<Pairs<'a>>,
    #[serde(default, borrow)]
    subject_id: Option<Cow<'a, str>>,
    // Read only to check its keys and strings.
    #[serde(default, deserialize_with = "present")]
    #[allow(dead_code)]
    metadata: Option<KeyCount>,
}

/// A JSON object of strings, in order (duplicates kept, so they can be refused).
struct Pairs<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, Cow<'de, str>>()? {
                    if pairs.len() >= MAX_ATTRIBUTES {
                        return Err(de::Error::custom("too many attributes"));
                    }
                    pairs.push((k, v));
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(V)
    }
}

/// One chat turn as JSON holds it (serde refuses unknown and repeated keys).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: Cow<'a, str>,
}

/// A JSON array of at most `MAX_MESSAGES` chat turns.
struct Messages<'a>(Vec<RawMessage<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Messages<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of chat messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut messages = Vec::new();
                while let Some(message) = seq.next_element::<RawMessage<'de>>()? {
                    if messages.len() >= MAX_MESSAGES {
                        return Err(de::Error::custom("too many messages"));
                    }
                    messages.push(message);
                }
                Ok(Messages(messages))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Chat turns as `(role, content)` when each is what `ChatMessage` accepts unchanged.
fn chat_turns(raw: Vec<RawMessage<'_>>) -> Option<Vec<(&'static str, String)>> {
    let mut turns = Vec::with_capacity(raw.len());
    for message in raw {
        let role = ROLES.iter().find(|&&r| r == message.role)?;
        if chars(&message.content) > MAX_TEXT_CHARS || !storable(&message.content) {
            return None;
        }
        turns.push((*role, message.content.into_owned()));
    }
    Some(turns)
}

/// The distinct keys of a JSON object whose values are only checked (metadata).
struct KeyCount;

impl<'de> Deserialize<'de> for KeyCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut keys: Vec<Cow<'de, str>> = Vec::new();
                while let Some((k, _)) = map.next_entry::<Cow<'de, str>, Storable>()? {
                    if keys.len() >= MAX_METADATA_KEYS || keys.contains(&k) || !storable(&k) {
                        return Err(de::Error::custom(
                            "too many, repeated or unstorable metadata keys",
                        ));
                    }
                    keys.push(k);
                }
                Ok(KeyCount)
            }
        }
        d.deserialize_map(V)
    }
}

/// Any JSON value, read only to check that its strings and keys are storable.
///
/// Its strings are read as `str`, which serde_json refuses for lone surrogate escapes, and
/// it nests no deeper than serde_json's recursion limit: what it refuses is deferred.
struct Storable;

impl<'de> Deserialize<'de> for Storable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Storable;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Storable, E> {
                Ok(Storable)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Storable, E> {
                Ok(Storable)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Storable, E> {
                Ok(Storable)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Storable, E> {
                Ok(Storable)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Storable, E> {
                Ok(Storable)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Storable, E> {
                if storable(s) {
                    Ok(Storable)
                } else {
                    Err(E::custom("NUL in metadata"))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Storable, A::Error> {
                while seq.next_element::<Storable>()?.is_some() {}
                Ok(Storable)
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Storable, M::Error> {
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if !storable(&k) {
                        return Err(de::Error::custom("NUL in a metadata key"));
                    }
                    map.next_value::<Storable>()?;
                }
                Ok(Storable)
            }
        }
        d.deserialize_any(V)
    }
}

/// No NUL: PostgreSQL text cannot store it (the Python validator decides such events).
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

fn chars(s: &str) -> usize {
    if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    }
}

fn identifier(s: &str) -> bool {
    !s.is_empty() && chars(s) <= MAX_ID_CHARS && storable(s)
}

fn in_ms_range(x: f64) -> bool {
    (0.0..=MAX_MS).contains(&x)
}

/// Parse and check `bytes`; `None` defers the message to the Python validator.
pub fn parse_event(bytes: &[u8], quality: &Quality) -> Option<Event> {
    let raw: Raw = serde_json::from_slice(bytes).ok()?;
    if raw.schema_version.is_some_and(|v| v != 1) {
        return None;
    }
    let request_id = raw.request_id?;
    let started = parse_timestamp(raw.started_at.as_deref()?)?;
    let finished = match raw.finished_at.as_deref() {
        Some(text) => Some(parse_timestamp(text)?),
        None => None,
    };
    if finished.is_some_and(|f| f < started) {
        return None;
    }
    let version = raw.model_version.unwrap_or(Cow::Borrowed("unknown"));
    if !identifier(&request_id) || !identifier(&raw.model_id) || !identifier(&version) {
        return None;
    }
    let prompt = raw.prompt.unwrap_or_default();
    let response = raw.response.unwrap_or_default();
    if chars(&prompt) > MAX_TEXT_CHARS || chars(&response) > MAX_TEXT_CHARS {
        return None;
    }
    if !storable(&prompt) || !storable(&response) {
        return None;
    }
    let messages = match raw.messages {
        Some(messages) => Some(chat_turns(messages.0)?),
        None => None,
    };
    if !in_ms_range(raw.latency_ms) || !raw.time_to_first_token_ms.is_none_or(in_ms_range) {
        return None;
    }
    if raw.prompt_tokens.is_some_and(|n| n > MAX_TOKENS)
        || raw.completion_tokens.is_some_and(|n| n > MAX_TOKENS)
    {
        return None;
    }
    let status = match raw.status.as_deref() {
        None => 0,
        Some(s) => STATUSES.iter().position(|&x| x == s)?,
    };
    let finish_reason = match raw.finish_reason.as_deref() {
        None => None,
        Some(s) => Some(FINISH_REASONS.iter().position(|&x| x == s)?),
    };
    if raw
        .error_code
        .as_deref()
        .is_some_and(|c| chars(c) > MAX_ERROR_CODE_CHARS || !storable(c))
    {
        return None;
    }
    if raw.subject_id.as_deref().is_some_and(|s| !identifier(s)) {
        return None;
    }
    let pairs = raw.segment.map(|p| p.0).unwrap_or_default();
    let mut segment: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let key_chars = chars(&k);
        if key_chars == 0 || key_chars > MAX_ATTRIBUTE_KEY_CHARS {
            return None;
        }
        if chars(&v) > MAX_ATTRIBUTE_VALUE_CHARS || segment.iter().any(|(seen, _)| *seen == k) {
            return None;
        }
        if !storable(&k) || !storable(&v) {
            return None;
        }
        segment.push((k.into_owned(), v.into_owned()));
    }
    let mut sorted_segment = segment.clone();
    // Python sorts attribute names by code point; Rust's str order is the same (UTF-8).
    sorted_segment.sort();
    let signals = quality.of(&response);
    Some(Event {
        partition: 0,
        offset: 0,
        raw_index: 0,
        request_id: request_id.into_owned(),
        model: raw.model_id.into_owned(),
        version: version.into_owned(),
        // Completion time: started_at plus the latency truncated to whole milliseconds,
        // as Python's `aggregates.event_time_ms` computes it.
        t_ms: started.event_time_ms() + raw.latency_ms as i64,
        prompt: prompt.into_owned(),
        response: response.into_owned(),
        messages,
        latency_ms: raw.latency_ms,
        ttft_ms: raw.time_to_first_token_ms,
        prompt_tokens: raw.prompt_tokens,
        completion_tokens: raw.completion_tokens,
        status,
        error_code: raw.error_code.map(Cow::into_owned),
        truncated: status == 5 || finish_reason == Some(1),
        segment,
        sorted_segment,
        subject_id: raw.subject_id.map(Cow::into_owned),
        signals,
    })
}

/// An instant: microseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
struct Instant(i64);

impl Instant {
    /// `int(dt.timestamp() * 1000)`, with Python's float steps.
    fn event_time_ms(self) -> i64 {
        ((self.0 as f64 / 1e6) * 1000.0) as i64
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut n = 0i64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(c - b'0');
    }
    Some(n)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn parse_timestamp(text: &str) -> Option<Instant> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if !(1970..=2200).contains(&year) || !(1..=12).contains(&month) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0i64;
    if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = digits(&rest[1..=n])? * 10i64.pow(6 - n as u32);
        rest = &rest[1 + n..];
    }
    let offset_s = match rest {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (oh, om) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let s = oh * 3600 + om * 60;
            if *sign == b'-' {
                -s
            } else {
                s
            }
        }
        _ => return None,
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(Instant(seconds * 1_000_000 + micros))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn accepts(fields: &str) -> bool {
        let quality = Quality::new(vec![], vec![], 100, vec!["none".into()], HashMap::new())
            .expect("a valid configuration");
        let head = r#"{"request_id": "r", "model_id": "m", "started_at": "2026-01-01T00:00:00Z",
            "latency_ms": 5"#;
        parse_event(format!("{head}{fields}}}").as_bytes(), &quality).is_some()
    }

    #[test]
    fn nul_and_lone_surrogates_are_left_to_python() {
        assert!(accepts(""));
        assert!(accepts(
            r#", "prompt": "\ud83d\ude00 \\u0000", "metadata": {"k": ["\u00e9"]}"#
        ));
        for fields in [
            r#", "prompt": "a\u0000""#,
            r#", "response": "\u0000""#,
            r#", "model_version": "v\u0000""#,
            r#", "error_code": "\u0000""#,
            r#", "subject_id": "\u0000""#,
            r#", "segment": {"k\u0000": "v"}"#,
            r#", "segment": {"k": "v\u0000"}"#,
            r#", "metadata": {"k\u0000": 1}"#,
            r#", "metadata": {"k": [{"a": "\u0000"}]}"#,
            r#", "metadata": {"k": {"\u0000": null}}"#,
            r#", "prompt": "\ud800""#,
            r#", "prompt": "\udc00\ud800""#,
            r#", "metadata": {"k": "\ud800"}"#,
            r#", "metadata": {"\udfff": 1}"#,
            r#", "metadata": {"k": {"\ud800": 1}}"#,
            r#", "messages": [{"role": "user", "content": "a\u0000"}]"#,
            r#", "messages": [{"role": "user", "content": "\ud800"}]"#,
        ] {
            assert!(!accepts(fields), "accepted {fields}");
        }
        let deep = format!(
            r#", "metadata": {{"k": {}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(
            !accepts(&deep),
            "metadata deeper than the Python validator reads"
        );
    }

    #[test]
    fn messages_as_chat_message_reads_them() {
        assert!(accepts(r#", "messages": null"#));
        assert!(accepts(r#", "messages": []"#));
        assert!(accepts(
            r#", "messages": [{"role": "system", "content": ""}, {"content": "hi", "role": "user"}]"#
        ));
        let most = vec![r#"{"role": "tool", "content": "x"}"#; MAX_MESSAGES].join(",");
        assert!(accepts(&format!(r#", "messages": [{most}]"#)));
        let long = "x".repeat(MAX_TEXT_CHARS);
        assert!(accepts(&format!(
            r#", "messages": [{{"role": "user", "content": "{long}"}}]"#
        )));
        for fields in [
            format!(r#", "messages": [{most}, {{"role": "tool", "content": "x"}}]"#),
            format!(r#", "messages": [{{"role": "user", "content": "{long}x"}}]"#),
            r#", "messages": [{"role": "bot", "content": "x"}]"#.to_string(),
            r#", "messages": [{"role": "user"}]"#.to_string(),
            r#", "messages": [{"role": "user", "content": null}]"#.to_string(),
            r#", "messages": [{"role": "user", "content": "x", "name": "n"}]"#.to_string(),
            r#", "messages": [{"role": "user", "role": "user", "content": "x"}]"#.to_string(),
            r#", "messages": {"role": "user", "content": "x"}"#.to_string(),
            r#", "messages": ["x"]"#.to_string(),
        ] {
            assert!(!accepts(&fields), "accepted {fields}");
        }
    }

    #[test]
    fn timestamps() {
        let t = parse_timestamp("1970-01-01T00:00:01.5Z").unwrap();
        assert_eq!(t.0, 1_500_000);
        let a = parse_timestamp("2026-11-29T10:00:00+01:00").unwrap();
        let b = parse_timestamp("2026-11-29T09:00:00Z").unwrap();
        assert!(a == b);
        assert!(parse_timestamp("2026-02-29T00:00:00Z").is_none());
        assert!(parse_timestamp("2024-02-29T00:00:00Z").is_some());
        assert!(parse_timestamp("2026-11-29T10:00:00").is_none());
        assert!(parse_timestamp("2026-11-29 10:00:00Z").is_none());
    }
}
