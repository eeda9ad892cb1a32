//! genmon's native ingest path (the Python module `genmon_native`).
//!
//! A *fast path* beside the pydantic one, never instead of it: [`Decoder::decode`] accepts
//! only inference events whose JSON it can read exactly as `InferenceEvent.model_validate_json`
//! would, and *defers* every other message (missing defaults, exotic types or timestamps,
//! anything invalid) to the Python validator, which stays the one authority on what is valid
//! and why not. [`Batch::aggregate`] then does the per-event work of
//! `WindowState.on_inferences` (offset filter, skew and lateness, quality signals, grouping,
//! the feedback join in a [`JoinTable`]) without the GIL and hands Python a few groups per
//! batch. The module docstring of `genmon.streams.native` states the contract;
//! `tests/streams/test_native.py` checks it against the Python path.

mod event;
mod join;
mod quality;

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use event::{parse_event, Event, STATUSES};

// Each event costs a few dozen short-lived strings; glibc's allocator spent ~10 % of a
// worker's time on them (merging and splitting free chunks), mimalloc a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use join::{Inf, JoinTable, Joined};
use quality::Quality;

/// Decodes inference batches; holds the quality-signal configuration.
#[pyclass(module = "genmon_native", frozen)]
struct Decoder {
    quality: Quality,
}

#[pymethods]
impl Decoder {
    /// `openings`: refusal phrases that count at the start (folded, without `^`);
    /// `anywhere`: phrases that count anywhere in the first `scan_chars` characters;
    /// `function_words`: word -> languages (indices into `languages`, in ambiguity order).
    #[new]
    fn new(
        openings: Vec<String>,
        anywhere: Vec<String>,
        scan_chars: usize,
        languages: Vec<String>,
        function_words: HashMap<String, Vec<usize>>,
    ) -> PyResult<Self> {
        let quality = Quality::new(openings, anywhere, scan_chars, languages, function_words)
            .map_err(pyo3::exceptions::PyValueError::new_err)?;
        Ok(Decoder { quality })
    }

    /// Decode `values` (bytes) read at `partitions[i]`, `offsets[i]`.
    fn decode(
        &self,
        values: &Bound<'_, PyList>,
        partitions: Vec<i64>,
        offsets: Vec<i64>,
        max_bytes: usize,
    ) -> PyResult<Batch> {
        let mut batch = self.empty_batch();
        self.add(&mut batch, values, &partitions, &offsets, max_bytes)?;
        Ok(batch)
    }

    /// Decode more values into `batch` (canonical forms of deferred events, say); returns
    /// the indices of `values` the fast path deferred again.
    fn extend(
        &self,
        mut batch: PyRefMut<'_, Batch>,
        values: &Bound<'_, PyList>,
        partitions: Vec<i64>,
        offsets: Vec<i64>,
        max_bytes: usize,
    ) -> PyResult<Vec<usize>> {
        let mut more = self.empty_batch();
        self.add(&mut more, values, &partitions, &offsets, max_bytes)?;
        let base = batch.raws.len();
        for mut event in more.events {
            event.raw_index += base;
            batch.events.push(event);
        }
        batch.raws.extend(more.raws);
        Ok(more.deferred)
    }

    /// The quality signals of one response: (empty, refusal, chars, language), for tests.
    fn signals(&self, response: &str) -> (bool, bool, usize, String) {
        let s = self.quality.of(response);
        (
            s.empty,
            s.refusal,
            s.chars,
            self.quality.language_name(s.language).to_string(),
        )
    }
}

impl Decoder {
    fn empty_batch(&self) -> Batch {
        Batch {
            events: Vec::new(),
            raws: Vec::new(),
            deferred: Vec::new(),
            languages: self.quality.language_names(),
        }
    }

    fn add(
        &self,
        batch: &mut Batch,
        values: &Bound<'_, PyList>,
        partitions: &[i64],
        offsets: &[i64],
        max_bytes: usize,
    ) -> PyResult<()> {
        if partitions.len() != values.len() || offsets.len() != values.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "values, partitions and offsets must have the same length",
            ));
        }
        // The bytes stay alive (and immutable) in `batch.raws` while they are parsed
        // without the GIL, so Faust's consumer thread can fetch the next batch meanwhile.
        let mut slices = Slices(Vec::with_capacity(values.len()));
        let first = batch.raws.len();
        for value in values.iter() {
            slices.0.push(match value.downcast::<PyBytes>() {
                Ok(bytes) if bytes.as_bytes().len() <= max_bytes => {
                    let data = bytes.as_bytes();
                    Some((data.as_ptr(), data.len()))
                }
                _ => None,
            });
            batch.raws.push(value.unbind());
        }
        let quality = &self.quality;
        let parsed: Vec<Option<Event>> = values.py().allow_threads(move || {
            let slices = slices;
            slices
                .0
                .iter()
                .map(|slice| {
                    // SAFETY: each slice points into a bytes object `batch.raws` holds.
                    slice.and_then(|(data, len)| {
                        parse_event(unsafe { std::slice::from_raw_parts(data, len) }, quality)
                    })
                })
                .collect()
        });
        for (i, parsed) in parsed.into_iter().enumerate() {
            match parsed {
                Some(mut event) => {
                    event.partition = partitions[i];
                    event.offset = offsets[i];
                    event.raw_index = first + i;
                    batch.events.push(event);
                }
                None => batch.deferred.push(i),
            }
        }
        Ok(())
    }
}

/// Pointers to the contents of live bytes objects, read without the GIL.
struct Slices(Vec<Option<(*const u8, usize)>>);

// SAFETY: bytes objects are immutable, and the caller keeps them alive while they are read.
unsafe impl Send for Slices {}

/// Decoded events of one fetched batch (any number of partitions).
#[pyclass(module = "genmon_native")]
struct Batch {
    events: Vec<Event>,
    /// The bytes of every decoded value, accepted or not, by input index.
    raws: Vec<PyObject>,
    /// Input indices the fast path left to the Python validator.
    #[pyo3(get)]
    deferred: Vec<usize>,
    /// Language labels by index (the decoder's), for the groups' `languages`.
    languages: Vec<String>,
}

/// Window geometry the lateness test needs (see `WindowPlan.too_late`).
#[derive(FromPyObject)]
struct Plan {
    pane_ms: i64,
    /// (size_ms, step_ms) of each window family.
    specs: Vec<(i64, i64)>,
    expires_ms: i64,
}

impl Plan {
    /// An event at `t_ms` is too late once one of the windows holding it has closed
    /// (`closed`: per window family, its largest closed end) or its pane expired.
    fn too_late(&self, t_ms: i64, watermark: i64, closed: Option<&Vec<i64>>) -> bool {
        let pane = t_ms - t_ms.rem_euclid(self.pane_ms);
        if pane + self.expires_ms <= watermark {
            return true;
        }
        let Some(closed) = closed else {
            return false;
        };
        self.specs
            .iter()
            .zip(closed)
            .any(|(&(size, step), &closed_end)| {
                let last_start = pane - pane.rem_euclid(step);
                let earlier = (last_start - pane + size - 1).div_euclid(step);
                last_start - earlier * step + size <= closed_end
            })
    }
}

#[derive(Default)]
struct Summary {
    n: u64,
    sum: f64,
    max: f64,
}

impl Summary {
    fn add(&mut self, value: f64) {
        self.n += 1;
        self.sum += value;
        if value > self.max {
            self.max = value;
        }
    }
}

/// (model, version, pane start, attributes sorted by name) of a group.
type GroupKey<'a> = (&'a str, &'a str, i64, &'a [(String, String)]);

/// Statistics of the events sharing (model, version, pane, attributes).
struct Group {
    first: usize,
    min_offset: i64,
    max_offset: i64,
    requests: u64,
    errors: u64,
    by_status: Vec<(usize, u64)>,
    by_error_code: Vec<(String, u64)>,
    latencies: Vec<f64>,
    ttfts: Vec<f64>,
    /// Time per output token of each event that has one (see `tpot_ms`).
    tpots: Vec<f64>,
    prompt_tokens: Summary,
    completion_tokens: Summary,
    chars: Summary,
    empty: u64,
    truncated: u64,
    refusal: u64,
    languages: Vec<(usize, u64)>,
    flagged: Vec<usize>,
}

fn bump<K: PartialEq>(counts: &mut Vec<(K, u64)>, key: K) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

impl Group {
    fn new(first: usize, offset: i64) -> Self {
        Group {
            first,
            min_offset: offset,
            max_offset: offset,
            requests: 0,
            errors: 0,
            by_status: Vec::new(),
            by_error_code: Vec::new(),
            latencies: Vec::new(),
            ttfts: Vec::new(),
            tpots: Vec::new(),
            prompt_tokens: Summary::default(),
            completion_tokens: Summary::default(),
            chars: Summary::default(),
            empty: 0,
            truncated: 0,
            refusal: 0,
            languages: Vec::new(),
            flagged: Vec::new(),
        }
    }

    fn add(&mut self, event: &Event) {
        self.min_offset = self.min_offset.min(event.offset);
        self.max_offset = self.max_offset.max(event.offset);
        self.requests += 1;
        bump(&mut self.by_status, event.status);
        let error = event.is_error();
        if error {
            self.errors += 1;
        }
        if let Some(code) = &event.error_code {
            match self.by_error_code.iter_mut().find(|(k, _)| k == code) {
                Some((_, n)) => *n += 1,
                None => self.by_error_code.push((code.clone(), 1)),
            }
        }
        self.latencies.push(event.latency_ms);
        if let Some(ttft) = event.ttft_ms {
            self.ttfts.push(ttft);
        }
        if let Some(tpot) = tpot_ms(event, error) {
            self.tpots.push(tpot);
        }
        if let Some(n) = event.prompt_tokens {
            self.prompt_tokens.add(n as f64);
        }
        if let Some(n) = event.completion_tokens {
            self.completion_tokens.add(n as f64);
        }
        let s = &event.signals;
        self.chars.add(s.chars as f64);
        // Empty and refusing answers count among answered (non-error) requests only.
        let empty = s.empty && !error;
        let refusal = s.refusal && !error;
        self.empty += empty as u64;
        self.truncated += event.truncated as u64;
        self.refusal += refusal as u64;
        bump(&mut self.languages, s.language);
        if empty || event.truncated || refusal || error {
            self.flagged.push(event.raw_index);
        }
    }
}

/// Python's `genmon.streams.windows.stats.tpot_ms`, the same float expression (so both paths
/// add bit-identical values): `(latency - ttft) / (tokens - 1)` for a non-error event with a
/// time to first token no later than its latency and at least two completion tokens.
fn tpot_ms(event: &Event, error: bool) -> Option<f64> {
    let (ttft, tokens) = (event.ttft_ms?, event.completion_tokens?);
    if error || tokens < 2 || event.latency_ms < ttft {
        return None;
    }
    Some((event.latency_ms - ttft) / ((tokens - 1) as f64))
}

fn summary<'py>(py: Python<'py>, s: &Summary) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            s.n.into_pyobject(py)?.into_any(),
            s.sum.into_pyobject(py)?.into_any(),
            s.max.into_pyobject(py)?.into_any(),
        ],
    )
}

#[pymethods]
impl Batch {
    fn __len__(&self) -> usize {
        self.events.len()
    }

    /// The bytes behind input index `i` (for building a pydantic event when one is needed).
    fn raw(&self, py: Python<'_>, i: usize) -> PyObject {
        self.raws[i].clone_ref(py)
    }

    /// `(input index, partition, offset)` of the accepted events, by input index (values
    /// added by `Decoder.extend` are numbered after those of `Decoder.decode`).
    fn accepted(&self) -> Vec<(usize, i64, i64)> {
        self.events
            .iter()
            .map(|e| (e.raw_index, e.partition, e.offset))
            .collect()
    }

    /// Partitions with accepted events, ascending.
    fn partitions(&self) -> Vec<i64> {
        let mut out: Vec<i64> = self.events.iter().map(|e| e.partition).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The per-event work of `WindowState.on_inferences` for one partition's events.
    ///
    /// Returns a dict: `fresh`, `skipped`, `skew`, `late` (counts), `max_offset`,
    /// `newest` (model -> latest event time of non-future events), `groups` (see
    /// `genmon.streams.native`) and `pairs` ([(offset, model, request id, inference record,
    /// feedback record)]: what the batch's inferences joined in `joins`, in offset order).
    #[allow(clippy::too_many_arguments)]
    fn aggregate<'py>(
        &self,
        py: Python<'py>,
        partition: i64,
        done_offset: i64,
        now_ms: i64,
        skew_ms: i64,
        watermarks: HashMap<String, i64>,
        closed: HashMap<String, Vec<i64>>,
        plan: Plan,
        joins: &Bound<'py, JoinTable>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = joins.borrow_mut();
        let table: &mut JoinTable = &mut guard;
        // The per-event work runs without the GIL (Faust's consumer thread fetches
        // meanwhile); only the few groups and pairs become Python objects below.
        let work = py.allow_threads(|| {
            self.group_and_join(
                partition,
                done_offset,
                now_ms,
                skew_ms,
                &watermarks,
                &closed,
                &plan,
                table,
            )
        });
        let Work {
            fresh,
            skipped,
            skew,
            late,
            max_offset,
            newest,
            keys,
            groups,
            pairs,
        } = work;
        let out = PyDict::new(py);
        out.set_item("fresh", fresh)?;
        out.set_item("skipped", skipped)?;
        out.set_item("skew", skew)?;
        out.set_item("late", late)?;
        out.set_item("max_offset", max_offset)?;
        let newest_dict = PyDict::new(py);
        for (model, t) in &newest {
            newest_dict.set_item(*model, *t)?;
        }
        out.set_item("newest", newest_dict)?;

        let py_groups = PyList::empty(py);
        for (group, key) in groups.iter().zip(keys) {
            let e = &self.events[group.first];
            let attrs = PyDict::new(py);
            for (k, v) in &e.segment {
                attrs.set_item(k, v)?;
            }
            let by_status = PyDict::new(py);
            for (s, n) in &group.by_status {
                by_status.set_item(STATUSES[*s], n)?;
            }
            let by_code = PyDict::new(py);
            for (c, n) in &group.by_error_code {
                by_code.set_item(c, n)?;
            }
            let languages = PyDict::new(py);
            for (l, n) in &group.languages {
                languages.set_item(self.language_name(*l), n)?;
            }
            let item = PyDict::new(py);
            item.set_item("model", key.0)?;
            item.set_item("version", key.1)?;
            item.set_item("pane", key.2)?;
            item.set_item("attributes", attrs)?;
            item.set_item("min_offset", group.min_offset)?;
            item.set_item("max_offset", group.max_offset)?;
            item.set_item("requests", group.requests)?;
            item.set_item("errors", group.errors)?;
            item.set_item("by_status", by_status)?;
            item.set_item("by_error_code", by_code)?;
            item.set_item("latencies", PyList::new(py, &group.latencies)?)?;
            item.set_item("ttfts", PyList::new(py, &group.ttfts)?)?;
            item.set_item("tpots", PyList::new(py, &group.tpots)?)?;
            item.set_item("prompt_tokens", summary(py, &group.prompt_tokens)?)?;
            item.set_item("completion_tokens", summary(py, &group.completion_tokens)?)?;
            item.set_item("response_chars", summary(py, &group.chars)?)?;
            item.set_item("empty", group.empty)?;
            item.set_item("truncated", group.truncated)?;
            item.set_item("refusal", group.refusal)?;
            item.set_item("languages", languages)?;
            item.set_item("flagged", PyList::new(py, &group.flagged)?)?;
            py_groups.append(item)?;
        }
        out.set_item("groups", py_groups)?;

        let py_pairs = PyList::empty(py);
        for (offset, event, joined) in pairs {
            let e = &self.events[event];
            for pair in joined {
                let (record, feedback) = pair.into_py(py)?;
                py_pairs.append((offset, &e.model, &e.request_id, record, feedback))?;
            }
        }
        out.set_item("pairs", py_pairs)?;
        Ok(out)
    }
}

impl Batch {
    #[allow(clippy::too_many_arguments)]
    fn group_and_join<'a>(
        &'a self,
        partition: i64,
        done_offset: i64,
        now_ms: i64,
        skew_ms: i64,
        watermarks: &HashMap<String, i64>,
        closed: &HashMap<String, Vec<i64>>,
        plan: &Plan,
        table: &mut JoinTable,
    ) -> Work<'a> {
        let mut order: Vec<usize> = (0..self.events.len())
            .filter(|&i| self.events[i].partition == partition)
            .collect();
        order.sort_by_key(|&i| self.events[i].offset);
        let (mut fresh, mut skipped, mut skew, mut late) = (0u64, 0u64, 0u64, 0u64);
        let mut max_offset: Option<i64> = None;
        let mut newest: Vec<(&str, i64)> = Vec::new();
        let mut group_index: FxHashMap<GroupKey, usize> = FxHashMap::default();
        let mut groups: Vec<Group> = Vec::new();
        // A model without a clock starts it `expires_ms` before its newest event here
        // (`WindowState._clock_seeds`).
        let mut seeds: Vec<(&str, i64)> = Vec::new();
        for &i in &order {
            let e = &self.events[i];
            if e.offset <= done_offset
                || e.t_ms > now_ms + skew_ms
                || watermarks.contains_key(&e.model)
            {
                continue;
            }
            match seeds.iter_mut().find(|(m, _)| *m == e.model) {
                Some((_, t)) => *t = (*t).max(e.t_ms),
                None => seeds.push((&e.model, e.t_ms)),
            }
        }
        for &i in &order {
            let e = &self.events[i];
            max_offset = Some(max_offset.map_or(e.offset, |m| m.max(e.offset)));
            if e.offset <= done_offset {
                skipped += 1;
                continue;
            }
            fresh += 1;
            if e.t_ms > now_ms + skew_ms {
                skew += 1;
                continue;
            }
            // Judged against the largest event time before it: the model's watermark (or
            // seed), then the batch's earlier events.
            let mut wm = match watermarks.get(&e.model) {
                Some(&wm) => wm,
                None => seeds
                    .iter()
                    .find(|(m, _)| *m == e.model)
                    .map_or(i64::MIN, |&(_, t)| t - plan.expires_ms),
            };
            match newest.iter_mut().find(|(m, _)| *m == e.model) {
                Some((_, t)) => {
                    wm = wm.max(*t);
                    *t = (*t).max(e.t_ms);
                }
                None => newest.push((&e.model, e.t_ms)),
            }
            if plan.too_late(e.t_ms, wm, closed.get(&e.model)) {
                late += 1;
                continue;
            }
            let pane = e.t_ms - e.t_ms.rem_euclid(plan.pane_ms);
            let key = (
                e.model.as_str(),
                e.version.as_str(),
                pane,
                e.sorted_segment.as_slice(),
            );
            let g = *group_index.entry(key).or_insert_with(|| {
                groups.push(Group::new(i, e.offset));
                groups.len() - 1
            });
            groups[g].add(e);
        }

        // Every fresh event (late and future ones too) goes into the join, in offset order.
        let mut pairs = Vec::new();
        for &i in &order {
            let e = &self.events[i];
            if e.offset <= done_offset {
                continue;
            }
            let cut_at = table.max_text_chars();
            let turns: Option<Vec<(&str, &str)>> =
                e.messages.as_ref().map(|turns| kept_turns(turns, cut_at));
            let inf = Inf::new(
                &e.version,
                cut(&e.prompt, cut_at),
                cut(&e.response, cut_at),
                turns.as_deref(),
                &e.segment,
                e.subject_id.as_deref(),
                e.t_ms,
            );
            let joined = table.add_inf(&e.model, &e.request_id, inf, e.t_ms);
            if !joined.is_empty() {
                pairs.push((e.offset, i, joined));
            }
        }
        // Groups are numbered in the order their first event came (offset order), which is
        // the order the Python path meets them (segment-cap admissions depend on it).
        let mut keys: Vec<Option<(&str, &str, i64)>> = vec![None; groups.len()];
        for (key, &g) in &group_index {
            keys[g] = Some((key.0, key.1, key.2));
        }
        let keys = keys
            .into_iter()
            .map(|key| key.expect("every group has a key"))
            .collect();
        Work {
            fresh,
            skipped,
            skew,
            late,
            max_offset,
            newest,
            keys,
            groups,
            pairs,
        }
    }
}

/// What `Batch.aggregate` computes without the GIL.
struct Work<'a> {
    fresh: u64,
    skipped: u64,
    skew: u64,
    late: u64,
    max_offset: Option<i64>,
    newest: Vec<(&'a str, i64)>,
    /// (model, version, pane start) of each group, in group order.
    keys: Vec<(&'a str, &'a str, i64)>,
    groups: Vec<Group>,
    /// (offset, event index, pairs its inference completed).
    pairs: Vec<(i64, usize, Vec<Joined>)>,
}

impl Batch {
    fn language_name(&self, l: usize) -> &str {
        &self.languages[l]
    }
}

/// The first `max_chars` characters of `text` (Python's `text[:max_chars]`).
fn cut(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// `into[k] = into.get(k, 0) + n` for every `k, n` of `other` (Python's `+`, so any int).
#[pyfunction]
fn add_counts(into: &Bound<'_, PyDict>, other: &Bound<'_, PyDict>) -> PyResult<()> {
    for (key, n) in other.iter() {
        match into.get_item(&key)? {
            Some(old) => into.set_item(key, old.add(n)?)?,
            None => into.set_item(key, n)?,
        }
    }
    Ok(())
}

/// What `QuantileSketch.add_many` adds for `values` (negative ones count as zero):
/// (bins {key: count} in key order, zeros, count, sum, min, max), keys as
/// `ceil(log2(v) * multiplier + offset)` for the values above `min_possible`.
#[pyfunction]
fn sketch_values(
    py: Python<'_>,
    values: Vec<f64>,
    multiplier: f64,
    offset: f64,
    min_possible: f64,
) -> PyResult<(Bound<'_, PyDict>, u64, u64, f64, f64, f64)> {
    let mut bins: std::collections::BTreeMap<i64, u64> = std::collections::BTreeMap::new();
    let (mut zeros, mut sum) = (0u64, 0.0f64);
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for &value in &values {
        let v = if value < 0.0 { 0.0 } else { value };
        sum += v;
        if v < low {
            low = v;
        }
        if v > high {
            high = v;
        }
        if v > min_possible {
            *bins
                .entry((v.log2() * multiplier + offset).ceil() as i64)
                .or_insert(0) += 1;
        } else {
            zeros += 1;
        }
    }
    let out = PyDict::new(py);
    for (key, n) in bins {
        out.set_item(key, n)?;
    }
    Ok((out, zeros, values.len() as u64, sum, low, high))
}

/// JSON bytes of `value` (dicts with str keys, lists, tuples, str, int, float, bool, None),
/// read back by `json.loads` as `json.dumps` output is (NaN and infinities included).
/// Raises `TypeError` for anything else, so the caller can fall back to `json.dumps`.
#[pyfunction]
fn dumps<'py>(py: Python<'py>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(256);
    write_json(&mut out, value)?;
    Ok(PyBytes::new(py, &out))
}

fn write_json(out: &mut Vec<u8>, value: &Bound<'_, PyAny>) -> PyResult<()> {
    if value.is_none() {
        out.extend_from_slice(b"null");
    } else if let Ok(s) = value.downcast::<PyString>() {
        write_str(out, s.to_str()?);
    } else if let Ok(b) = value.downcast::<pyo3::types::PyBool>() {
        out.extend_from_slice(if b.is_true() { b"true" } else { b"false" });
    } else if let Ok(i) = value.downcast::<pyo3::types::PyInt>() {
        let n: i64 = i.extract()?;
        out.extend_from_slice(n.to_string().as_bytes());
    } else if let Ok(f) = value.downcast::<pyo3::types::PyFloat>() {
        let x = f.value();
        if x.is_nan() {
            out.extend_from_slice(b"NaN");
        } else if x.is_infinite() {
            out.extend_from_slice(if x > 0.0 { b"Infinity" } else { b"-Infinity" });
        } else {
            // Debug keeps a fraction or exponent, so the value reads back as a float.
            out.extend_from_slice(format!("{x:?}").as_bytes());
        }
    } else if let Ok(d) = value.downcast::<PyDict>() {
        out.push(b'{');
        for (i, (k, v)) in d.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let key = k
                .downcast::<PyString>()
                .map_err(|_| pyo3::exceptions::PyTypeError::new_err("dict keys must be str"))?;
            write_str(out, key.to_str()?);
            out.push(b':');
            write_json(out, &v)?;
        }
        out.push(b'}');
    } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        out.push(b'[');
        for (i, item) in value.try_iter()?.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json(out, &item?)?;
        }
        out.push(b']');
    } else {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "cannot encode {} as JSON",
            value.get_type().name()?
        )));
    }
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[pymodule]
fn genmon_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Decoder>()?;
    m.add_class::<Batch>()?;
    m.add_class::<JoinTable>()?;
    m.add_function(wrap_pyfunction!(dumps, m)?)?;
    m.add_function(wrap_pyfunction!(add_counts, m)?)?;
    m.add_function(wrap_pyfunction!(sketch_values, m)?)?;
    Ok(())
}

/// The latest chat turns whose texts, each cut to `max_chars`, fit together in `max_chars`
/// (the latest one always, cut): `genmon.streams.windows.join.kept_turns`.
fn kept_turns<'a>(
    turns: &'a [(&'static str, String)],
    max_chars: usize,
) -> Vec<(&'a str, &'a str)> {
    let mut kept = Vec::new();
    let mut total = 0;
    for (role, content) in turns.iter().rev() {
        let content = cut(content, max_chars);
        let chars = content.chars().count();
        if !kept.is_empty() && total + chars > max_chars {
            break;
        }
        kept.push((*role as &str, content));
        total += chars;
    }
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_of(events: &[&str]) -> Group {
        let quality = Quality::new(vec![], vec![], 100, vec!["none".into()], HashMap::new())
            .expect("a valid configuration");
        let mut group = Group::new(0, 0);
        for json in events {
            let head =
                r#"{"request_id": "r", "model_id": "m", "started_at": "2026-01-01T00:00:00Z""#;
            let event = parse_event(format!("{head}, {json}}}").as_bytes(), &quality)
                .expect("accepted by the fast path");
            group.add(&event);
        }
        group
    }

    #[test]
    fn tpot_only_for_answered_events_with_tokens_after_the_first() {
        let group = group_of(&[
            r#""latency_ms": 110, "time_to_first_token_ms": 10, "completion_tokens": 5"#,
            r#""latency_ms": 110, "time_to_first_token_ms": 10, "completion_tokens": 1"#,
            r#""latency_ms": 5, "time_to_first_token_ms": 10, "completion_tokens": 5"#,
            r#""latency_ms": 110, "completion_tokens": 5"#,
            r#""latency_ms": 110, "time_to_first_token_ms": 10, "completion_tokens": 5,
                "status": "error""#,
        ]);
        assert_eq!(group.tpots, vec![25.0]);
    }

    #[test]
    fn empty_errors_are_errors_only() {
        let group = group_of(&[
            r#""latency_ms": 1, "response": "", "status": "timeout""#,
            r#""latency_ms": 1, "response": """#,
        ]);
        assert_eq!((group.errors, group.empty), (1, 1));
        assert_eq!(group.flagged.len(), 2);
    }
}
