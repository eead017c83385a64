//! llama.cpp's GBNF grammars, converted to llguidance's Lark syntax.
//!
//! The parser follows llama.cpp's `grammar-parser` (rules `name ::= alternatives`, a rule ends at
//! a newline outside parentheses, `#` comments, literals with `\x \u \U \t \r \n \\ \"` escapes,
//! character classes with ranges and `^`, `.`, `* + ? {m} {m,} {m,n}`, token references
//! `<[id]>` / `<text>` and their negation `!<...>`). The output is one Lark rule per GBNF rule:
//! literals become JSON-escaped strings, classes and `.` become regexes over code points,
//! `root` becomes `start` and every other name is renamed into Lark's lowercase rule names
//! (`Foo-bar` -> `g-_foo-bar`, so distinct names stay distinct).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::error::{Error, Result};

/// Most nested parentheses accepted (the parser recurses on them).
const MAX_DEPTH: usize = 200;

/// Converts GBNF text to Lark. `token_id` resolves `<text>` token references to ids (return
/// `None` for an unknown token: that is an error naming it).
pub fn gbnf_to_lark(src: &str, token_id: &dyn Fn(&str) -> Option<u32>) -> Result<String> {
    let mut p = Parser {
        s: src.as_bytes(),
        src,
        pos: 0,
        token_id,
        defined: Vec::new(),
        used: BTreeSet::new(),
        depth: 0,
    };
    let mut out = String::new();
    p.space(true);
    while p.pos < p.s.len() {
        let name = p.name().ok_or_else(|| p.err("expected a rule name"))?;
        p.space(false);
        if !p.eat("::=") {
            return Err(p.err(&format!("expected `::=` after rule name `{name}`")));
        }
        p.space(true);
        let body = p.alternatives(false)?;
        if p.defined.contains(&name) {
            return Err(p.err(&format!("rule `{name}` is defined twice")));
        }
        let _ = writeln!(out, "{}: {}", lark_name(&name), body);
        p.defined.push(name);
        // A rule ends at a newline (or the end of the text).
        if p.pos < p.s.len() {
            if !p.eat_newline() {
                return Err(p.err("expected a newline after the rule"));
            }
            p.space(true);
        }
    }
    if !p.defined.iter().any(|n| n == "root") {
        return Err(Error::Grammar("GBNF grammar has no `root` rule".into()));
    }
    if let Some(missing) = p.used.iter().find(|u| !p.defined.contains(u)) {
        return Err(Error::Grammar(format!(
            "GBNF grammar uses rule `{missing}` but does not define it"
        )));
    }
    Ok(out)
}

/// Whether `text` looks like GBNF rather than Lark: its first rule is written `name ::= ...`.
pub fn looks_like_gbnf(text: &str) -> bool {
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with("//") {
            continue;
        }
        return l
            .split_once("::=")
            .is_some_and(|(name, _)| !name.trim().is_empty() && name.trim().bytes().all(word));
    }
    false
}

fn lark_name(name: &str) -> String {
    if name == "root" {
        return "start".into();
    }
    let mut s = String::from("g-");
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    pos: usize,
    token_id: &'a dyn Fn(&str) -> Option<u32>,
    defined: Vec<String>,
    used: BTreeSet<String>,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, msg: &str) -> Error {
        let mut pos = self.pos.min(self.src.len());
        while !self.src.is_char_boundary(pos) {
            pos -= 1;
        }
        let line = self.src[..pos].bytes().filter(|&b| b == b'\n').count() + 1;
        let col_start = self.src[..pos].rfind('\n').map_or(0, |i| i + 1);
        let col = self.src[col_start..pos].chars().count() + 1;
        Error::Grammar(format!("GBNF line {line}, column {col}: {msg}"))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    fn eat_newline(&mut self) -> bool {
        self.eat("\r\n") || self.eat("\n") || self.eat("\r")
    }

    /// Skips blanks and comments; newlines too when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n' && c != b'\r') {
                        self.pos += 1;
                    }
                }
                b'\n' | b'\r' if newlines => self.pos += 1,
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(word) {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.src[start..self.pos].to_string())
    }

    fn alternatives(&mut self, nested: bool) -> Result<String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some(b'|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts.join(" | "))
    }

    fn sequence(&mut self, nested: bool) -> Result<String> {
        let mut items: Vec<String> = Vec::new();
        loop {
            let item = match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    let mut text = String::new();
                    loop {
                        match self.peek() {
                            None => return Err(self.err("unterminated string literal")),
                            Some(b'"') => {
                                self.pos += 1;
                                break;
                            }
                            _ => text.push(self.char_or_escape()?),
                        }
                    }
                    serde_json::to_string(&text).expect("a string serializes")
                }
                Some(b'[') => {
                    self.pos += 1;
                    let negated = self.eat("^");
                    let mut class = String::from(if negated { "[^" } else { "[" });
                    let mut empty = true;
                    loop {
                        match self.peek() {
                            None => return Err(self.err("unterminated character class")),
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => {
                                let lo = self.char_or_escape()?;
                                let _ = write!(class, "\\x{{{:x}}}", lo as u32);
                                if self.peek() == Some(b'-')
                                    && self.s.get(self.pos + 1) != Some(&b']')
                                {
                                    self.pos += 1;
                                    if self.peek().is_none() {
                                        return Err(self.err("unterminated character class"));
                                    }
                                    let hi = self.char_or_escape()?;
                                    if hi < lo {
                                        return Err(self.err(&format!(
                                            "character range {lo:?}-{hi:?} is reversed"
                                        )));
                                    }
                                    let _ = write!(class, "-\\x{{{:x}}}", hi as u32);
                                }
                                empty = false;
                            }
                        }
                    }
                    if empty {
                        return Err(self.err("empty character class"));
                    }
                    class.push(']');
                    format!("/{class}/")
                }
                Some(b'.') => {
                    self.pos += 1;
                    "/(?s:.)/".to_string()
                }
                Some(b'(') => {
                    self.pos += 1;
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(self.err("parentheses nested too deeply"));
                    }
                    self.space(true);
                    let inner = self.alternatives(true)?;
                    self.depth -= 1;
                    if !self.eat(")") {
                        return Err(self.err("expected `)`"));
                    }
                    format!("({inner})")
                }
                Some(b'!') | Some(b'<') => {
                    let negated = self.eat("!");
                    if !self.eat("<") {
                        return Err(self.err("expected a token reference `<...>` after `!`"));
                    }
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c != b'>' && c != b'\n') {
                        self.pos += 1;
                    }
                    if !self.eat(">") {
                        return Err(self.err("unterminated token reference"));
                    }
                    let inner = &self.src[start..self.pos - 1];
                    let id = if let Some(num) =
                        inner.strip_prefix('[').and_then(|s| s.strip_suffix(']'))
                    {
                        num.trim()
                            .parse::<u32>()
                            .map_err(|_| self.err(&format!("token id `{num}` is not a number")))?
                    } else {
                        let text = format!("<{inner}>");
                        (self.token_id)(&text)
                            .ok_or_else(|| self.err(&format!("unknown token `{text}`")))?
                    };
                    format!("<[{}{id}]>", if negated { "^" } else { "" })
                }
                Some(c) if word(c) => {
                    let name = self.name().expect("a word character starts a name");
                    // `name ::=` on the same line would be a missing newline; llama.cpp reads it
                    // as a new rule only after one.
                    self.used.insert(name.clone());
                    lark_name(&name)
                }
                _ => break,
            };
            self.space(nested);
            let item = self.repetition(item)?;
            items.push(item);
            self.space(nested);
        }
        if items.is_empty() {
            // An empty alternative (`a ::= "x" | `) matches the empty string.
            return Ok("\"\"".into());
        }
        Ok(items.join(" "))
    }

    fn repetition(&mut self, item: String) -> Result<String> {
        match self.peek() {
            Some(c @ (b'*' | b'+' | b'?')) => {
                self.pos += 1;
                Ok(format!("{item}{}", c as char))
            }
            Some(b'{') => {
                self.pos += 1;
                self.space(true);
                let min = self.number()?;
                self.space(true);
                let max = if self.eat(",") {
                    self.space(true);
                    if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        Some(self.number()?)
                    } else {
                        None
                    }
                } else {
                    Some(min)
                };
                self.space(true);
                if !self.eat("}") {
                    return Err(self.err("expected `}` closing a repetition"));
                }
                match max {
                    Some(max) if max < min => {
                        Err(self.err(&format!("repetition {{{min},{max}}} has max below min")))
                    }
                    Some(0) => Ok("\"\"".into()),
                    Some(max) => Ok(format!("{item}{{{min},{max}}}")),
                    None => Ok(format!("{item}{{{min},}}")),
                }
            }
            _ => Ok(item),
        }
    }

    fn number(&mut self) -> Result<u32> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let text = &self.src[start..self.pos];
        match text.parse::<u32>() {
            Ok(n) if n <= 100_000 => Ok(n),
            Ok(n) => Err(self.err(&format!("repetition count {n} is too large (most 100000)"))),
            Err(_) => Err(self.err("expected a number in a repetition")),
        }
    }

    /// One character of a literal or class, escapes decoded.
    fn char_or_escape(&mut self) -> Result<char> {
        let rest = &self.src[self.pos..];
        let c = rest
            .chars()
            .next()
            .ok_or_else(|| self.err("unexpected end"))?;
        if c != '\\' {
            self.pos += c.len_utf8();
            return Ok(c);
        }
        self.pos += 1;
        let e = self.src[self.pos..]
            .chars()
            .next()
            .ok_or_else(|| self.err("unterminated escape"))?;
        self.pos += e.len_utf8();
        let hex = |p: &mut Self, n: usize| -> Result<char> {
            let digits = p.src.get(p.pos..p.pos + n).unwrap_or("");
            let v = u32::from_str_radix(digits, 16)
                .ok()
                .filter(|_| digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| p.err(&format!("expected {n} hex digits in an escape")))?;
            p.pos += n;
            char::from_u32(v).ok_or_else(|| p.err(&format!("escape U+{v:X} is not a character")))
        };
        Ok(match e {
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            't' => '\t',
            'r' => '\r',
            'n' => '\n',
            '\\' | '"' | '[' | ']' | '-' | '^' => e,
            other => {
                return Err(self.err(&format!("unknown escape `\\{other}`")));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(s: &str) -> Result<String> {
        gbnf_to_lark(s, &|t| (t == "<|eot|>").then_some(7))
    }

    #[test]
    fn converts_rules_literals_classes_and_repetitions() {
        let g = r#"
# arithmetic
root  ::= expr
expr  ::= term ("+" term | "-" term)*
term  ::= [0-9]+ | "(" expr ")" | Num-X{2,3} | .? <|eot|> !<[5]>
Num-X ::= "\x41\u00e9\"" [^a\]]
"#;
        let l = conv(g).unwrap();
        assert_eq!(
            l,
            "start: g-expr\n\
             g-expr: g-term (\"+\" g-term | \"-\" g-term)*\n\
             g-term: /[\\x{30}-\\x{39}]/+ | \"(\" g-expr \")\" | g-_num-_x{2,3} | /(?s:.)/? <[7]> <[^5]>\n\
             g-_num-_x: \"Aé\\\"\" /[^\\x{61}\\x{5d}]/\n"
        );
    }

    #[test]
    fn multi_line_rules_inside_parentheses_and_after_bars() {
        let g = "root ::= (\n  \"a\"\n  | \"b\" ) |\n  \"c\"\nx ::= \"y\" # c\n";
        let l = conv(g).unwrap();
        assert_eq!(l, "start: (\"a\" | \"b\") | \"c\"\ng-x: \"y\"\n");
    }

    #[test]
    fn errors_name_the_problem() {
        for (g, want) in [
            ("expr ::= \"a\"", "no `root` rule"),
            ("root ::= foo", "does not define it"),
            ("root ::= \"a", "unterminated string"),
            ("root ::= [a", "unterminated character class"),
            ("root ::= [z-a]", "reversed"),
            ("root ::= \"a\"{3,1}", "max below min"),
            ("root ::= <nope>", "unknown token"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root = \"a\"", "expected `::=`"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root ::= (\"a\"", "expected `)`"),
            ("root ::= \"a\"\n | \"b\"", "expected a rule name"),
            ("root ::= \"a\"{999999999}", "too large"),
        ] {
            let e = conv(g).unwrap_err().to_string();
            assert!(e.contains(want), "{g:?}: {e}");
        }
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(1000), ")".repeat(1000));
        assert!(conv(&deep).unwrap_err().to_string().contains("too deeply"));
    }

    #[test]
    fn detects_gbnf() {
        assert!(looks_like_gbnf("# c\nroot ::= \"a\""));
        assert!(!looks_like_gbnf("start: \"a\"\nx ::= y"));
        assert!(!looks_like_gbnf("// c\nstart: /a/"));
    }
}
