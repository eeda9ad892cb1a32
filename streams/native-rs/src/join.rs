//! `JoinTable`: one partition's feedback-join entries, without a Python object per entry.
//!
//! The same table as `genmon.streams.windows.join.JoinTable` (the reference, whose docstring
//! states the semantics); `tests/streams/test_native.py` drives both with the same operations and
//! compares what they return and write. Every inference costs a handful of allocations:
//! its join key (shared by the indexes) and its record, kept as the JSON the segment
//! records hold. Feedback records, which are few, are kept as the caller's dict plus its
//! JSON. Segment records are written as JSON bytes, which the store sends as they are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{write_json, write_str};

const SEP: char = '\u{1f}';

type Key = Arc<str>;

/// An inference as an entry keeps it (`genmon.streams.windows.join.inference_record`): its JSON,
/// and the characters of its texts (the record size estimate counts them).
pub struct Inf {
    json: Box<[u8]>,
    chars: usize,
}

impl Inf {
    /// The record of `version, prompt, response, messages, segment, subject, t`, texts
    /// already cut; `messages` (`(role, content)` turns) only when the event has them.
    pub fn new(
        version: &str,
        prompt: &str,
        response: &str,
        messages: Option<&[(&str, &str)]>,
        segment: &[(String, String)],
        subject: Option<&str>,
        t: i64,
    ) -> Self {
        let mut out = Vec::with_capacity(96 + prompt.len() + response.len());
        out.extend_from_slice(b"{\"version\":");
        write_str(&mut out, version);
        out.extend_from_slice(b",\"prompt\":");
        write_str(&mut out, prompt);
        out.extend_from_slice(b",\"response\":");
        write_str(&mut out, response);
        let mut chars = prompt.chars().count() + response.chars().count();
        if let Some(messages) = messages {
            out.extend_from_slice(b",\"messages\":[");
            for (i, (role, content)) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"role\":");
                write_str(&mut out, role);
                out.extend_from_slice(b",\"content\":");
                write_str(&mut out, content);
                out.push(b'}');
                chars += content.chars().count();
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"segment\":{");
        for (i, (k, v)) in segment.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(&mut out, k);
            out.push(b':');
            write_str(&mut out, v);
        }
        out.extend_from_slice(b"},\"subject\":");
        match subject {
            Some(s) => write_str(&mut out, s),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"t\":");
        out.extend_from_slice(t.to_string().as_bytes());
        out.push(b'}');
        Inf {
            json: out.into_boxed_slice(),
            chars,
        }
    }

    fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
        let mut segment = Vec::new();
        for (k, v) in item(d, "segment")?.downcast::<PyDict>()?.iter() {
            segment.push((text(&k)?, text(&v)?));
        }
        let subject = item(d, "subject")?;
        let subject = if subject.is_none() {
            None
        } else {
            Some(text(&subject)?)
        };
        // Records written before chat messages existed have no `messages`.
        let messages = match d.get_item("messages")? {
            Some(list) if !list.is_none() => {
                let mut turns = Vec::new();
                for turn in list.downcast::<PyList>()?.iter() {
                    let turn = turn.downcast::<PyDict>()?;
                    turns.push((text(&item(turn, "role")?)?, text(&item(turn, "content")?)?));
                }
                Some(turns)
            }
            _ => None,
        };
        let turns: Option<Vec<(&str, &str)>> = messages.as_ref().map(|turns| {
            turns
                .iter()
                .map(|(r, c)| (r.as_str(), c.as_str()))
                .collect()
        });
        Ok(Inf::new(
            &text(&item(d, "version")?)?,
            &text(&item(d, "prompt")?)?,
            &text(&item(d, "response")?)?,
            turns.as_deref(),
            &segment,
            subject.as_deref(),
            item(d, "t")?.extract()?,
        ))
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        Ok(json_loads(py, &self.json)?.downcast_into::<PyDict>()?)
    }
}

fn json_loads<'py>(py: Python<'py>, json: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    static LOADS: GILOnceCell<PyObject> = GILOnceCell::new();
    let loads = LOADS.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("json")?.getattr("loads")?.unbind())
    })?;
    loads.bind(py).call1((PyBytes::new(py, json),))
}

/// A feedback record: the caller's dict, its id and its JSON.
struct Fb {
    id: String,
    json: Vec<u8>,
    record: Py<PyDict>,
}

impl Fb {
    fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
        let mut json = Vec::new();
        write_json(&mut json, d.as_any())?;
        Ok(Fb {
            id: text(&item(d, "id")?)?,
            json,
            record: d.clone().unbind(),
        })
    }
}

struct Entry {
    inf: Option<Inf>,
    fb: Vec<Fb>,
    seen: Vec<String>,
    exp: i64,
}

fn item<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(key)?
        .ok_or_else(|| PyKeyError::new_err(key.to_owned()))
}

fn text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    // Lossy: a lone surrogate (valid in a Python str, not in UTF-8) becomes U+FFFD.
    Ok(value.downcast::<PyString>()?.to_string_lossy().into_owned())
}

fn model_of(key: &str) -> &str {
    key.split(SEP).next().unwrap_or(key)
}

type Pair<'py> = (String, String, Bound<'py, PyDict>, Py<PyDict>);

/// A feedback record an inference joined, and the inference's record (as JSON).
pub struct Joined {
    inf: Arc<[u8]>,
    feedback: Py<PyDict>,
}

impl Joined {
    /// (inference record, feedback record) as Python dicts.
    pub fn into_py(self, py: Python<'_>) -> PyResult<(Bound<'_, PyDict>, Py<PyDict>)> {
        Ok((
            json_loads(py, &self.inf)?.downcast_into::<PyDict>()?,
            self.feedback,
        ))
    }
}

#[pyclass(module = "genmon_native")]
pub struct JoinTable {
    #[pyo3(get)]
    ttl_ms: i64,
    #[pyo3(get)]
    max_text_chars: usize,
    floors: FxHashMap<String, (i64, Key)>,
    entries: FxHashMap<Key, Entry>,
    pending: usize,
    /// Per model its entries' `(exp, join key)`, ordered; models in id order.
    order: BTreeMap<String, BTreeSet<(i64, Key)>>,
    /// Changed keys in first-change order: a key counts at the position `unwritten` maps it to.
    unwritten_order: Vec<Key>,
    unwritten: FxHashMap<Key, usize>,
    segment_of: FxHashMap<Key, u64>,
    live: FxHashMap<u64, usize>,
    models_in: FxHashMap<u64, FxHashSet<String>>,
    next_segment: u64,
    dead: Vec<u64>,
}

#[pymethods]
impl JoinTable {
    #[new]
    fn new(ttl_ms: i64, max_text_chars: usize) -> PyResult<Self> {
        if ttl_ms <= 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "feedback.join_ttl_s must be > 0, got {}",
                ttl_ms as f64 / 1000.0
            )));
        }
        Ok(JoinTable {
            ttl_ms,
            max_text_chars,
            floors: FxHashMap::default(),
            entries: FxHashMap::default(),
            pending: 0,
            order: BTreeMap::new(),
            unwritten_order: Vec::new(),
            unwritten: FxHashMap::default(),
            segment_of: FxHashMap::default(),
            live: FxHashMap::default(),
            models_in: FxHashMap::default(),
            next_segment: 0,
            dead: Vec::new(),
        })
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    #[getter]
    fn pending(&self) -> usize {
        self.pending
    }

    #[getter]
    fn get_floors(&self) -> HashMap<String, (i64, String)> {
        self.floors
            .iter()
            .map(|(m, (exp, key))| (m.clone(), (*exp, key.to_string())))
            .collect()
    }

    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (key, entry) in &self.entries {
            let d = PyDict::new(py);
            match &entry.inf {
                Some(inf) => d.set_item("inf", inf.to_dict(py)?)?,
                None => d.set_item("inf", py.None())?,
            }
            let fb = PyList::empty(py);
            for f in &entry.fb {
                fb.append(f.record.bind(py))?;
            }
            d.set_item("fb", fb)?;
            d.set_item("seen", &entry.seen)?;
            d.set_item("exp", entry.exp)?;
            out.set_item(&**key, d)?;
        }
        Ok(out)
    }

    fn models(&self) -> HashSet<String> {
        self.order.keys().cloned().collect()
    }

    fn add_inference<'py>(
        &mut self,
        py: Python<'py>,
        model: &str,
        request_id: &str,
        record: &Bound<'py, PyDict>,
    ) -> PyResult<Vec<Pair<'py>>> {
        let t: i64 = item(record, "t")?.extract()?;
        let inf = Inf::from_dict(record)?;
        let mut pairs = Vec::new();
        for joined in self.add_inf(model, request_id, inf, t) {
            let (record, feedback) = joined.into_py(py)?;
            pairs.push((model.to_owned(), request_id.to_owned(), record, feedback));
        }
        Ok(pairs)
    }

    fn add_feedback<'py>(
        &mut self,
        py: Python<'py>,
        model: &str,
        request_id: &str,
        record: &Bound<'py, PyDict>,
    ) -> PyResult<Vec<Pair<'py>>> {
        let fb = Fb::from_dict(record)?;
        let t: i64 = item(record, "t")?.extract()?;
        let exp = t + self.ttl_ms;
        let key = self.key(model, request_id);
        match self.entries.get(&key) {
            None => self.insert(
                model,
                key.clone(),
                Entry {
                    inf: None,
                    fb: vec![],
                    seen: vec![],
                    exp,
                },
            ),
            Some(entry) => {
                if entry.seen.contains(&fb.id) || entry.fb.iter().any(|f| f.id == fb.id) {
                    return Ok(Vec::new());
                }
                self.extend(model, &key, exp);
            }
        }
        self.mark_unwritten(&key);
        let entry = self.entries.get_mut(&key).expect("just put");
        match &entry.inf {
            None => {
                if entry.fb.is_empty() {
                    self.pending += 1;
                }
                entry.fb.push(fb);
                Ok(Vec::new())
            }
            Some(inf) => {
                entry.seen.push(fb.id.clone());
                let pair = (
                    model.to_owned(),
                    request_id.to_owned(),
                    inf.to_dict(py)?,
                    fb.record,
                );
                Ok(vec![pair])
            }
        }
    }

    fn expire(&mut self, py: Python<'_>, watermarks: HashMap<String, i64>) -> (usize, usize) {
        py.allow_threads(|| self.expire_entries(&watermarks))
    }

    fn evict(
        &mut self,
        py: Python<'_>,
        max_entries: usize,
        watermarks: HashMap<String, i64>,
    ) -> (usize, usize) {
        py.allow_threads(|| self.evict_entries(max_entries, &watermarks))
    }

    fn segments<'py>(
        &mut self,
        py: Python<'py>,
        max_bytes: usize,
    ) -> Vec<(u64, Bound<'py, PyBytes>)> {
        let records = py.allow_threads(|| self.write_segments(max_bytes));
        records
            .into_iter()
            .map(|(seq, json)| (seq, PyBytes::new(py, &json)))
            .collect()
    }

    fn take_dead(&mut self) -> Vec<u64> {
        let mut dead = std::mem::take(&mut self.dead);
        dead.sort_unstable();
        dead
    }

    fn forget(&mut self, models: HashSet<String>) {
        for model in &models {
            self.floors.remove(model);
        }
        let stale: FxHashSet<u64> = self
            .models_in
            .iter()
            .filter(|(_, found)| found.iter().any(|m| models.contains(m)))
            .map(|(&seq, _)| seq)
            .collect();
        let mut keys: Vec<Key> = self
            .segment_of
            .iter()
            .filter(|(_, seq)| stale.contains(seq))
            .map(|(key, _)| key.clone())
            .collect();
        keys.sort();
        for key in keys {
            self.mark_unwritten(&key);
        }
    }

    /// `records`: `(seq, {join key: entry dict})`; `floors`: model -> `(exp, join key)`.
    fn restore(
        &mut self,
        records: Vec<(u64, Bound<'_, PyDict>)>,
        watermarks: HashMap<String, i64>,
        floors: HashMap<String, (i64, String)>,
    ) -> PyResult<()> {
        self.floors = floors
            .into_iter()
            .map(|(m, (exp, key))| (m, (exp, Key::from(key))))
            .collect();
        let mut records = records;
        records.sort_by_key(|(seq, _)| *seq);
        for (seq, entries) in &records {
            let mut models = FxHashSet::default();
            for (key, value) in entries.iter() {
                let key: Key = Key::from(text(&key)?);
                let entry = entry_from_dict(value.downcast::<PyDict>()?)?;
                models.insert(model_of(&key).to_owned());
                self.segment_of.insert(key.clone(), *seq);
                self.entries.insert(key, entry);
            }
            self.models_in.insert(*seq, models);
            self.next_segment = seq + 1;
        }
        let keys: Vec<Key> = self.entries.keys().cloned().collect();
        for key in keys {
            let model = model_of(&key).to_owned();
            let exp = self.entries[&key].exp;
            let expired = watermarks.get(&model).is_some_and(|&wm| exp <= wm);
            let below = self
                .floors
                .get(&model)
                .is_some_and(|floor| (exp, &key) <= (floor.0, &floor.1));
            if expired || below {
                self.entries.remove(&key);
                self.segment_of.remove(&key);
                continue;
            }
            *self.live.entry(self.segment_of[&key]).or_insert(0) += 1;
            if !self.entries[&key].fb.is_empty() {
                self.pending += 1;
            }
            self.order_mut(&model).insert((exp, key));
        }
        for (seq, _) in &records {
            if !self.live.contains_key(seq) {
                self.models_in.remove(seq);
                self.dead.push(*seq);
            }
        }
        Ok(())
    }
}

fn time_left(model: &str, exp: i64, watermarks: &HashMap<String, i64>) -> (bool, i64) {
    match watermarks.get(model) {
        Some(&watermark) => (true, exp - watermark),
        None => (false, 0),
    }
}

fn entry_from_dict(d: &Bound<'_, PyDict>) -> PyResult<Entry> {
    let inf = item(d, "inf")?;
    let mut fb = Vec::new();
    for f in item(d, "fb")?.downcast::<PyList>()?.iter() {
        fb.push(Fb::from_dict(f.downcast::<PyDict>()?)?);
    }
    let mut seen = Vec::new();
    for id in item(d, "seen")?.downcast::<PyList>()?.iter() {
        seen.push(text(&id)?);
    }
    Ok(Entry {
        inf: if inf.is_none() {
            None
        } else {
            Some(Inf::from_dict(inf.downcast::<PyDict>()?)?)
        },
        fb,
        seen,
        exp: item(d, "exp")?.extract()?,
    })
}

fn write_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.extend_from_slice(b"{\"inf\":");
    match &entry.inf {
        Some(inf) => out.extend_from_slice(&inf.json),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"fb\":[");
    for (i, f) in entry.fb.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&f.json);
    }
    out.extend_from_slice(b"],\"seen\":[");
    for (i, id) in entry.seen.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, id);
    }
    out.extend_from_slice(b"],\"exp\":");
    out.extend_from_slice(entry.exp.to_string().as_bytes());
    out.push(b'}');
}

impl JoinTable {
    fn expire_entries(&mut self, watermarks: &HashMap<String, i64>) -> (usize, usize) {
        let (mut dropped, mut orphaned) = (0, 0);
        for (model, &watermark) in watermarks {
            while self.top(model).is_some_and(|(exp, _)| exp <= watermark) {
                orphaned += self.drop_top(model);
                dropped += 1;
            }
        }
        (dropped, orphaned)
    }

    fn evict_entries(
        &mut self,
        max_entries: usize,
        watermarks: &HashMap<String, i64>,
    ) -> (usize, usize) {
        let (mut evicted, mut orphaned) = (0, 0);
        let floors: Vec<(String, (i64, Key))> = self
            .floors
            .iter()
            .map(|(m, f)| (m.clone(), f.clone()))
            .collect();
        for (model, floor) in floors {
            while self.top(&model).is_some_and(|top| top <= floor) {
                orphaned += self.drop_top(&model);
                evicted += 1;
            }
        }
        let mut excess = self.entries.len().saturating_sub(max_entries);
        if excess > 0 {
            // Least event time left first; a model without a watermark first of all.
            let mut soonest: BTreeSet<((bool, i64), String)> = BTreeSet::new();
            for (model, set) in &self.order {
                let (exp, _) = set.first().expect("no empty sets");
                soonest.insert((time_left(model, *exp, watermarks), model.clone()));
            }
            while excess > 0 {
                let Some((_, model)) = soonest.pop_first() else {
                    break;
                };
                let item = self.top(&model).expect("listed models have entries");
                orphaned += self.drop_top(&model);
                evicted += 1;
                excess -= 1;
                match self.floors.get_mut(&model) {
                    Some(floor) if *floor >= item => {}
                    Some(floor) => *floor = item,
                    None => {
                        self.floors.insert(model.clone(), item);
                    }
                }
                if let Some((exp, _)) = self.top(&model) {
                    soonest.insert((time_left(&model, exp, watermarks), model));
                }
            }
        }
        self.floors
            .retain(|model, (exp, _)| match watermarks.get(model) {
                Some(&watermark) => *exp > watermark,
                None => true,
            });
        (evicted, orphaned)
    }

    /// The changed entries as segment records `(seq, JSON)` (see `segments`).
    fn write_segments(&mut self, max_bytes: usize) -> Vec<(u64, Vec<u8>)> {
        let mut records = Vec::new();
        let order = std::mem::take(&mut self.unwritten_order);
        let positions = std::mem::take(&mut self.unwritten);
        let mut chunk: Vec<Key> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut size = 0usize;
        for (at, key) in order.into_iter().enumerate() {
            if positions.get(&key) != Some(&at) {
                continue; // dropped, or changed again after a drop: counted where it is now
            }
            let entry = &self.entries[&key];
            out.extend_from_slice(if chunk.is_empty() { b"{\"e\":{" } else { b"," });
            write_str(&mut out, &key);
            out.push(b':');
            write_entry(&mut out, entry);
            size += 256 * (1 + entry.fb.len()) + entry.inf.as_ref().map_or(0, |inf| inf.chars);
            chunk.push(key);
            if size >= max_bytes {
                records.push(self.record(std::mem::take(&mut chunk), &mut out));
                size = 0;
            }
        }
        if !chunk.is_empty() {
            records.push(self.record(chunk, &mut out));
        }
        records
    }

    pub fn max_text_chars(&self) -> usize {
        self.max_text_chars
    }

    /// The inference side, for `add_inference` and the native batch (`t`: its event time);
    /// the waiting feedback it joins. Touches no Python object: runs without the GIL.
    pub fn add_inf(&mut self, model: &str, request_id: &str, inf: Inf, t: i64) -> Vec<Joined> {
        let exp = t + self.ttl_ms;
        let key = self.key(model, request_id);
        self.mark_unwritten(&key);
        if !self.entries.contains_key(&key) {
            self.insert(
                model,
                key,
                Entry {
                    inf: Some(inf),
                    fb: vec![],
                    seen: vec![],
                    exp,
                },
            );
            return Vec::new();
        }
        self.extend(model, &key, exp);
        let entry = self.entries.get_mut(&key).expect("checked");
        let mut joined = Vec::new();
        if !entry.fb.is_empty() {
            self.pending -= 1;
            let record: Arc<[u8]> = Arc::from(&*inf.json);
            for f in entry.fb.drain(..) {
                entry.seen.push(f.id);
                joined.push(Joined {
                    inf: record.clone(),
                    feedback: f.record,
                });
            }
        }
        entry.inf = Some(inf);
        joined
    }

    /// The key of `model, request_id`: the live entry's own (shared) if there is one.
    fn key(&self, model: &str, request_id: &str) -> Key {
        let text = format!("{model}{SEP}{request_id}");
        match self.entries.get_key_value(text.as_str()) {
            Some((key, _)) => key.clone(),
            None => Key::from(text),
        }
    }

    fn insert(&mut self, model: &str, key: Key, entry: Entry) {
        self.order_mut(model).insert((entry.exp, key.clone()));
        self.entries.insert(key, entry);
    }

    fn order_mut(&mut self, model: &str) -> &mut BTreeSet<(i64, Key)> {
        if !self.order.contains_key(model) {
            self.order.insert(model.to_owned(), BTreeSet::new());
        }
        self.order.get_mut(model).expect("just put")
    }

    fn extend(&mut self, model: &str, key: &Key, exp: i64) {
        let entry = self.entries.get_mut(key).expect("extend a live entry");
        if exp > entry.exp {
            let old = std::mem::replace(&mut entry.exp, exp);
            let set = self.order.get_mut(model).expect("live entries are ordered");
            set.remove(&(old, key.clone()));
            set.insert((exp, key.clone()));
        }
    }

    fn mark_unwritten(&mut self, key: &Key) {
        if !self.unwritten.contains_key(key) {
            self.unwritten
                .insert(key.clone(), self.unwritten_order.len());
            self.unwritten_order.push(key.clone());
        }
    }

    fn top(&self, model: &str) -> Option<(i64, Key)> {
        self.order.get(model).and_then(|set| set.first().cloned())
    }

    /// Drop the model's soonest entry; the feedback it orphans.
    fn drop_top(&mut self, model: &str) -> usize {
        let set = self.order.get_mut(model).expect("a model with entries");
        let (_, key) = set.pop_first().expect("a model with entries");
        if set.is_empty() {
            self.order.remove(model);
        }
        let entry = self.entries.remove(&key).expect("ordered entries are live");
        if !entry.fb.is_empty() {
            self.pending -= 1;
        }
        self.unwritten.remove(&key);
        if let Some(seq) = self.segment_of.remove(&key) {
            self.release(seq);
        }
        entry.fb.len()
    }

    fn release(&mut self, seq: u64) {
        let left = self.live.get_mut(&seq).expect("a live record");
        *left -= 1;
        if *left == 0 {
            self.live.remove(&seq);
            self.models_in.remove(&seq);
            self.dead.push(seq);
        }
    }

    fn record(&mut self, chunk: Vec<Key>, out: &mut Vec<u8>) -> (u64, Vec<u8>) {
        let seq = self.next_segment;
        self.next_segment += 1;
        out.extend_from_slice(b"}}");
        let json = std::mem::take(out);
        self.live.insert(seq, chunk.len());
        let models: FxHashSet<&str> = chunk.iter().map(|k| model_of(k)).collect();
        let models = models.into_iter().map(str::to_owned).collect();
        self.models_in.insert(seq, models);
        for key in chunk {
            if let Some(old) = self.segment_of.insert(key, seq) {
                self.release(old);
            }
        }
        (seq, json)
    }
}
