//! Decoding of JSON-form arguments the way BuildKit does it with Go's `encoding/json`:
//! one array value is read and anything after it is ignored; lone surrogates become U+FFFD;
//! numbers out of float64 range are a decode error (so the line falls back to shell form).

/// Result of reading a JSON array at the start of the arguments.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum JsonArray {
    /// A well-formed array of strings.
    Strings(Vec<String>),
    /// Well-formed, but an element is not a string: BuildKit rejects the instruction.
    NotStrings,
    /// Not a JSON array (syntax error, or not starting with `[`): shell form applies.
    Invalid,
}

/// Go's `encoding/json` nesting limit.
const MAX_DEPTH: usize = 10_000;

/// Reads the JSON array at the start of `text` (leading whitespace allowed).
pub(crate) fn decode_array(text: &str) -> JsonArray {
    let rest = text.trim_start();
    if !rest.starts_with('[') {
        return JsonArray::Invalid;
    }
    let mut p = Reader {
        s: rest.as_bytes(),
        text: rest,
        i: 0,
        bad_number: false,
    };
    match p.top_array() {
        Some(items) => {
            if p.bad_number {
                return JsonArray::Invalid;
            }
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                match it {
                    Some(s) => out.push(s),
                    None => return JsonArray::NotStrings,
                }
            }
            JsonArray::Strings(out)
        }
        None => JsonArray::Invalid,
    }
}

struct Reader<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
    bad_number: bool,
}

impl Reader<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// The top-level array: each element is `Some(string)` or `None` (not a string).
    fn top_array(&mut self) -> Option<Vec<Option<String>>> {
        self.i += 1; // '['
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            return Some(items);
        }
        loop {
            self.ws();
            if self.peek() == Some(b'"') {
                items.push(Some(self.string()?));
            } else {
                self.skip_value()?;
                items.push(None);
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => return Some(items),
                _ => return None,
            }
        }
    }

    /// Validates any value without recursion (explicit stack of open containers).
    fn skip_value(&mut self) -> Option<()> {
        // Stack entries: b'[' or b'{'.
        let mut stack: Vec<u8> = Vec::new();
        // Depth 1 is the top-level array we are inside of.
        loop {
            self.ws();
            // Parse one value start.
            match self.peek()? {
                b'[' | b'{' => {
                    let open = self.s[self.i];
                    self.i += 1;
                    if stack.len() + 2 > MAX_DEPTH {
                        return None;
                    }
                    stack.push(open);
                    self.ws();
                    let close = if open == b'[' { b']' } else { b'}' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        stack.pop();
                    } else {
                        if open == b'{' {
                            self.object_key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a value: close containers or move to the next element.
            loop {
                let Some(&top) = stack.last() else {
                    return Some(());
                };
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        if top == b'{' {
                            self.ws();
                            self.object_key()?;
                        }
                        break;
                    }
                    b']' if top == b'[' => {
                        self.i += 1;
                        stack.pop();
                    }
                    b'}' if top == b'{' => {
                        self.i += 1;
                        stack.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    fn object_key(&mut self) -> Option<()> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        self.string()?;
        self.ws();
        if self.peek()? != b':' {
            return None;
        }
        self.i += 1;
        Some(())
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            Some(())
        } else {
            None
        }
    }

    fn number(&mut self) -> Option<()> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        // The value must be followed by something (Go reads until a delimiter).
        self.peek()?;
        let num = &self.text[start..self.i];
        match num.parse::<f64>() {
            Ok(v) if v.is_finite() => {}
            _ => self.bad_number = true,
        }
        Some(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let mut v = 0u32;
        for &b in h {
            v = v * 16 + (b as char).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// A string at `"`; returns it decoded.
    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.i += 1;
                    let e = self.peek()?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let c = self.hex4()?;
                            if (0xD800..0xDC00).contains(&c) {
                                // A high surrogate combines with a following \uDC00-\uDFFF.
                                let save = self.i;
                                if self.s.get(self.i..self.i + 2) == Some(b"\\u") {
                                    self.i += 2;
                                    match self.hex4() {
                                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                                            let cp = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
                                            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                                            continue;
                                        }
                                        _ => self.i = save,
                                    }
                                }
                                out.push('\u{fffd}');
                            } else {
                                out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                            }
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => {
                    // Copy one UTF-8 character.
                    let ch = self.text[self.i..].chars().next()?;
                    out.push(ch);
                    self.i += ch.len_utf8();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_text_after_array_is_ignored() {
        assert_eq!(
            decode_array(r#"["a", "b"] tail"#),
            JsonArray::Strings(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn non_string_elements_are_rejected_but_overflow_is_shell_form() {
        assert_eq!(decode_array(r#"["a", 1]"#), JsonArray::NotStrings);
        assert_eq!(decode_array(r#"[{"a": [1, null]}]"#), JsonArray::NotStrings);
        assert_eq!(decode_array("[1e999]"), JsonArray::Invalid);
        assert_eq!(decode_array(r#"["a",]"#), JsonArray::Invalid);
    }

    #[test]
    fn lone_surrogate_becomes_replacement_char() {
        assert_eq!(
            decode_array(r#"["\ud800x", "\ud83d\ude00"]"#),
            JsonArray::Strings(vec!["\u{fffd}x".into(), "\u{1f600}".into()])
        );
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let deep = format!("[{}", "[".repeat(200_000));
        assert_eq!(decode_array(&deep), JsonArray::Invalid);
    }
}
