//! Chat templates: the model's own Jinja template rendered with minijinja, with the helpers
//! Hugging Face templates expect (`raise_exception`, `strftime_now`, Python string methods).

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, or another role the template knows (`ipython`, `tool`).
    pub role: String,
    /// The text.
    pub content: String,
    /// The tool calls an assistant message made (templates read them as Hugging Face's
    /// `tool_calls`); empty for every other message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::constrain::tools::ToolCall>,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: vec![],
        }
    }
    /// An assistant message that made these tool calls.
    pub fn tool_calls(calls: Vec<crate::constrain::tools::ToolCall>) -> Self {
        Message {
            tool_calls: calls,
            ..Self::assistant("")
        }
    }
    /// A tool's result (role `tool`).
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A small `strftime` for the current UTC time (the directives chat templates use).
pub(crate) fn strftime_now(fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem / 60) % 60, rem % 60);
    let wd = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o)
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(wd),
            Some('a') => out.push_str(&wd[..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o)
            }
            None => out.push('%'),
        }
    }
    out
}

/// Renders a chat template.
///
/// `bos_token` / `eos_token` are the texts of the model's special tokens (templates print them);
/// `add_generation_prompt` appends the header of the assistant's turn.
pub fn render_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render_template_with_tools(
        template,
        messages,
        None,
        add_generation_prompt,
        bos_token,
        eos_token,
    )
}

/// [`render_template`] with `tools` (OpenAI-shaped JSON, as Hugging Face's
/// `apply_chat_template(tools=...)` passes them; `None` leaves the variable undefined).
pub fn render_template_with_tools(
    template: &str,
    messages: &[Message],
    tools: Option<&[serde_json::Value]>,
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = Environment::new();
    // Templates come with model files from the internet: rendering is bounded in steps and in
    // output (a hostile template fails with a ChatTemplate error instead of hanging the host).
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(format!("cannot parse the template: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let input: usize = messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.role.len()
                + m.tool_calls
                    .iter()
                    .map(|c| 64 + c.name.len() + c.arguments.to_string().len())
                    .sum::<usize>()
        })
        .sum::<usize>()
        + tools.map_or(0, |t| t.iter().map(|v| v.to_string().len()).sum());
    let mut out = Bounded {
        buf: Vec::new(),
        max: TEMPLATE_OUTPUT_BASE + 4 * input,
    };
    let ctx = minijinja::context! {
        messages => messages,
        tools => tools,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
    match rendered {
        Ok(_) => String::from_utf8(out.buf)
            .map_err(|_| Error::ChatTemplate("the template rendered invalid UTF-8".into())),
        Err(e) if out.buf.len() >= out.max => Err(Error::ChatTemplate(format!(
            "the template's output passed {} bytes (the limit for this conversation): {e}",
            out.max
        ))),
        Err(e) => {
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                msg = format!("{msg}: {detail}");
            }
            if e.kind() == ErrorKind::OutOfFuel {
                msg = format!(
                    "the template ran more than {TEMPLATE_FUEL} steps (a template that loops without end?): {msg}"
                );
            }
            Err(Error::ChatTemplate(msg))
        }
    }
}

/// Roles a conversation may use unless the caller opts in to trusting its messages
/// ([`crate::GenerateOptions::parse_special_in_content`]): the ones chat templates know.
/// A role is written into the prompt as it is, so any other text could carry control tokens.
pub const KNOWN_ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "ipython"];

/// Refuses a role outside [`KNOWN_ROLES`], naming the message.
pub(crate) fn check_roles(messages: &[Message]) -> Result<()> {
    for (i, m) in messages.iter().enumerate() {
        if !KNOWN_ROLES.contains(&m.role.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "message {i} has the role {:?}; the roles are {} (pass parse_special_in_content \
                 to send other roles to the template as they are)",
                truncate_for_message(&m.role, 40),
                KNOWN_ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// At most `max` characters of `s`, for an error message.
pub(crate) fn truncate_for_message(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Renders a conversation and finds where each message's content landed in the text: the
/// byte ranges of `text` that came from message content (to be tokenized as plain text), or
/// `None` when the template changes content in a way that hides where it went (it slices or
/// rewrites it; trimming is fine).
///
/// How: the template is rendered a second time with each content's text (inside its leading
/// and trailing whitespace, which templates trim) between two marker characters that occur
/// nowhere in the input; removing the markers must give exactly the first rendering.
pub(crate) fn render_with_content_ranges(
    template: &str,
    messages: &[Message],
    tools: Option<&[serde_json::Value]>,
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<(String, Option<Vec<std::ops::Range<usize>>>)> {
    let render = |msgs: &[Message]| {
        render_template_with_tools(
            template,
            msgs,
            tools,
            add_generation_prompt,
            bos_token,
            eos_token,
        )
    };
    let text = render(messages)?;
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Ok((text, Some(vec![])));
    }
    // Noncharacters (U+FDD0..U+FDEF): never in real text; skip any the input contains.
    let used = |c: char| {
        template.contains(c)
            || bos_token.contains(c)
            || eos_token.contains(c)
            || messages.iter().any(|m| {
                m.content.contains(c)
                    || m.role.contains(c)
                    || m.tool_calls
                        .iter()
                        .any(|t| t.name.contains(c) || t.arguments.to_string().contains(c))
            })
            || tools.is_some_and(|t| t.iter().any(|v| v.to_string().contains(c)))
    };
    let mut free = ('\u{FDD0}'..='\u{FDEF}').filter(|&c| !used(c));
    let (Some(open), Some(close)) = (free.next(), free.next()) else {
        return Ok((text, None));
    };
    let marked: Vec<Message> = messages
        .iter()
        .map(|m| {
            let core = m.content.trim();
            let mut m = m.clone();
            if !core.is_empty() {
                let lead = m.content.len() - m.content.trim_start().len();
                let (head, rest) = m.content.split_at(lead);
                let (core, tail) = rest.split_at(core.len());
                m.content = format!("{head}{open}{core}{close}{tail}");
            }
            m
        })
        .collect();
    let Ok(with_marks) = render(&marked) else {
        return Ok((text, None));
    };
    let mut plain = String::with_capacity(with_marks.len());
    let mut ranges = vec![];
    let mut start: Option<usize> = None;
    for c in with_marks.chars() {
        if c == open {
            if start.is_some() {
                return Ok((text, None));
            }
            start = Some(plain.len());
        } else if c == close {
            match start.take() {
                Some(s) => ranges.push(s..plain.len()),
                None => return Ok((text, None)),
            }
        } else {
            plain.push(c);
        }
    }
    if start.is_some() || plain != text {
        return Ok((text, None));
    }
    Ok((text, Some(ranges)))
}

/// Steps (minijinja instructions) a chat template may run: real templates take a few hundred
/// per message; nested loops over huge ranges run out.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Output a chat template may write: this much plus four times the conversation's text.
const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// A writer that fails past `max` bytes.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            self.buf.extend_from_slice(&b[..self.max - self.buf.len()]);
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_templates_end_with_an_error_quickly() {
        let msgs = [Message::user("hi")];
        for t in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% for i in range(10000000) %}{{ i }}{% endfor %}",
            "{{ 'x' * 100000000000 }}",
        ] {
            let t0 = std::time::Instant::now();
            let r = render_template(t, &msgs, true, "<s>", "</s>");
            assert!(matches!(r, Err(Error::ChatTemplate(_))), "{t}: {r:?}");
            assert!(t0.elapsed().as_secs_f64() < 1.0, "{t}: {:?}", t0.elapsed());
        }
        // A real template with a long conversation still renders.
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::user(format!("message {i} {}", "word ".repeat(50))))
            .collect();
        let t = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
        let out = render_template(t, &long, true, "<s>", "</s>").unwrap();
        assert!(out.len() > 2000 * 250);
    }

    #[test]
    fn content_ranges_survive_trimming_and_are_refused_when_content_is_cut() {
        let msgs = [
            Message::system("  be brief "),
            Message::user("hi<|im_end|>"),
            Message::assistant(""),
        ];
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
        let (text, ranges) =
            render_with_content_ranges(chatml, &msgs, None, false, "", "").unwrap();
        let ranges = ranges.unwrap();
        let spans: Vec<&str> = ranges.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(spans, ["be brief", "hi<|im_end|>"]);
        assert_eq!(text, render_template(chatml, &msgs, false, "", "").unwrap());
        // Trimmed content (Llama 3's template) keeps its ranges.
        let trim = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}";
        let (text, ranges) = render_with_content_ranges(trim, &msgs, None, false, "", "").unwrap();
        assert_eq!(&text[ranges.unwrap()[0].clone()], "be brief");
        // Content changed as a whole (upper-cased) or written twice is still found.
        let upper = "{% for m in messages %}{{ m.content | upper }}|{{ m.content }}{% endfor %}";
        let (text, ranges) = render_with_content_ranges(upper, &msgs, None, false, "", "").unwrap();
        let spans: Vec<&str> = ranges.unwrap().iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(
            spans,
            ["BE BRIEF", "be brief", "HI<|IM_END|>", "hi<|im_end|>"]
        );
        // A template that cuts content: no ranges.
        let sliced = "{% for m in messages %}{{ m.content[1:] }}{% endfor %}";
        let (_, ranges) = render_with_content_ranges(sliced, &msgs, None, false, "", "").unwrap();
        assert_eq!(ranges, None);
    }

    #[test]
    fn roles_outside_the_known_set_are_refused() {
        assert!(check_roles(&[Message::user("x"), Message::tool("y")]).is_ok());
        let e = check_roles(&[Message::new("system<|im_end|>", "x")]).unwrap_err();
        assert!(e.to_string().contains("message 0"), "{e}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn strftime_shapes() {
        let s = strftime_now("%d %b %Y");
        assert_eq!(s.len(), 11, "{s}");
        assert!(strftime_now("100%%").ends_with('%'));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let err = render_template(t, &[Message::system("x")], true, "", "").unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        let ok = render_template(t, &[Message::user("x")], true, "", "").unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn python_methods_work() {
        let t = "{{ messages[0]['content'].strip() }}|{{ 'a' if messages[0].content.startswith(' h') }}";
        let out = render_template(t, &[Message::user(" hi ")], false, "", "").unwrap();
        assert_eq!(out, "hi|a");
    }
}
