//! `genmon.streams.windows.quality_signals` for one response, character for character.

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use aho_corasick::AhoCorasick;

/// Characters Python's `str.isspace()` accepts (what `str.strip()` removes).
fn python_space(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | '\u{1c}'..='\u{1f}' | ' ' | '\u{85}' | '\u{a0}'
            | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}'
            | '\u{205f}' | '\u{3000}'
    )
}

/// `RefusalPhrases.is_refusal`'s lstrip set.
const LEADING: [char; 7] = [' ', '\t', '\r', '\n', '"', '\'', '*'];
const LANGUAGE_SCAN_CHARS: usize = 200;

/// Fixed labels after the configured Latin languages.
const NONE: usize = 0;
const LATIN: usize = 1;
const SCRIPTS: [&str; 11] = [
    "none", "latin", "ja", "zh", "ko", "ru", "ar", "hi", "el", "he", "th",
];
const HAN: usize = 100;

pub struct Signals {
    pub empty: bool,
    pub refusal: bool,
    pub chars: usize,
    /// Index into `Quality::language_names()`.
    pub language: usize,
}

pub struct Quality {
    openings: Vec<String>,
    anywhere: Option<AhoCorasick>,
    scan_chars: usize,
    /// Configured Latin-script languages, in the order that breaks ties.
    languages: Vec<String>,
    function_words: FxHashMap<String, Vec<usize>>,
}

impl Quality {
    pub fn new(
        openings: Vec<String>,
        anywhere: Vec<String>,
        scan_chars: usize,
        languages: Vec<String>,
        function_words: HashMap<String, Vec<usize>>,
    ) -> Result<Self, String> {
        if function_words
            .values()
            .flatten()
            .any(|&l| l >= languages.len())
        {
            return Err("function word language index out of range".into());
        }
        let anywhere = if anywhere.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&anywhere).map_err(|e| e.to_string())?)
        };
        Ok(Quality {
            openings,
            anywhere,
            scan_chars,
            languages,
            function_words: function_words.into_iter().collect(),
        })
    }

    /// Labels by index: the fixed script labels, then the configured languages.
    pub fn language_names(&self) -> Vec<String> {
        SCRIPTS
            .iter()
            .map(|s| s.to_string())
            .chain(self.languages.iter().cloned())
            .collect()
    }

    pub fn language_name(&self, index: usize) -> &str {
        if index < SCRIPTS.len() {
            SCRIPTS[index]
        } else {
            &self.languages[index - SCRIPTS.len()]
        }
    }

    pub fn of(&self, response: &str) -> Signals {
        let empty = response.trim_matches(python_space).is_empty();
        let chars = if response.is_ascii() {
            response.len()
        } else {
            response.chars().count()
        };
        Signals {
            empty,
            refusal: !empty && self.is_refusal(response),
            chars,
            language: if empty { NONE } else { self.language(response) },
        }
    }

    fn is_refusal(&self, response: &str) -> bool {
        let head = head(response, self.scan_chars);
        let mut folded = head.to_lowercase();
        if !folded.is_ascii() {
            folded = folded.replace(['\u{2019}', '\u{2018}', '\u{2bc}'], "'");
        }
        let opening = folded.trim_start_matches(LEADING);
        if self
            .openings
            .iter()
            .any(|p| opening.starts_with(p.as_str()))
        {
            return true;
        }
        self.anywhere
            .as_ref()
            .is_some_and(|ac| ac.is_match(opening))
    }

    fn language(&self, text: &str) -> usize {
        let head = head(text, LANGUAGE_SCAN_CHARS);
        if head.is_ascii() {
            if !head.bytes().any(|b| b.is_ascii_alphabetic()) {
                return NONE;
            }
        } else {
            // Scripts in the order first seen, Latin (ASCII letters) first: Python's max()
            // over a dict keeps the first of equal counts.
            let mut counts: Vec<(usize, usize)> = Vec::new();
            let ascii_letters = head.chars().filter(|c| c.is_ascii_alphabetic()).count();
            if ascii_letters > 0 {
                counts.push((LATIN, ascii_letters));
            }
            for c in head.chars().filter(|c| !c.is_ascii()) {
                if let Some(script) = script(c as u32) {
                    match counts.iter_mut().find(|(s, _)| *s == script) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((script, 1)),
                    }
                }
            }
            if counts.is_empty() {
                return NONE;
            }
            if counts.iter().any(|&(s, _)| s == 2) {
                return 2; // ja
            }
            let mut best = counts[0];
            for &c in &counts[1..] {
                if c.1 > best.1 {
                    best = c;
                }
            }
            if best.0 == HAN {
                return 3; // zh
            }
            if best.0 != LATIN {
                return best.0;
            }
        }
        let lowered = head.to_lowercase();
        let mut hits = vec![0usize; self.languages.len()];
        for word in lowered.split(|c: char| !word_char(c)) {
            if let Some(langs) = self.function_words.get(word) {
                for &l in langs {
                    hits[l] += 1;
                }
            }
        }
        let mut top = 0;
        for (l, &n) in hits.iter().enumerate() {
            if n > hits[top] {
                top = l;
            }
        }
        if hits.get(top).copied().unwrap_or(0) > 0 {
            SCRIPTS.len() + top
        } else {
            LATIN
        }
    }
}

/// `text[:n]` in characters.
fn head(text: &str, n: usize) -> &str {
    match text.char_indices().nth(n) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// The function-word regex's word characters: `[a-zà-ÿ']` (U+00E0..=U+00FF, with ÷).
fn word_char(c: char) -> bool {
    c.is_ascii_lowercase() || ('\u{e0}'..='\u{ff}').contains(&c) || c == '\''
}

/// `quality_signals._script`: the script label of a non-ASCII code point.
fn script(code: u32) -> Option<usize> {
    if code < 0x250 {
        return if code >= 0xC0 { Some(LATIN) } else { None };
    }
    Some(match code {
        0x3040..=0x30FF => 2,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF => HAN,
        0xAC00..=0xD7AF | 0x1100..=0x11FF => 4,
        0x400..=0x4FF => 5,
        0x600..=0x6FF => 6,
        0x900..=0x97F => 7,
        0x370..=0x3FF => 8,
        0x590..=0x5FF => 9,
        0xE00..=0xE7F => 10,
        _ => return None,
    })
}
