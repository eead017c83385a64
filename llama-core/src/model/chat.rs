//! A conversation rendered with the model's chat template and tokenized: the template's markup
//! parsed into control tokens, message content kept as text (see [`crate::chat`]).

use crate::chat::{check_roles, render_template_with_tools, render_with_content_ranges, Message};
use crate::constrain::tools::{template_takes_tools, tools_prompt, Tool, ToolFormat};
use crate::error::{Error, Result};

impl super::Model {
    /// Renders a conversation with the model's chat template, ready for generation.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`crate::Model::apply_chat_template`] showing `tools` to the model: a template that reads
    /// `tools` gets them as Hugging Face passes them; any other template gets them (and the
    /// call format) in the system message, and earlier calls written as JSON text.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[Message],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String> {
        Ok(self
            .render_chat(messages, tools, add_generation_prompt, false)?
            .0)
    }

    /// The rendered conversation, and with `ranges` where message content landed in it (see
    /// [`crate::chat::render_with_content_ranges`]; `None` inside: the template hides it).
    fn render_chat(
        &self,
        messages: &[Message],
        tools: &[Tool],
        add_generation_prompt: bool,
        ranges: bool,
    ) -> Result<(String, Option<Vec<std::ops::Range<usize>>>)> {
        let template = self.chat_template().ok_or_else(|| {
            Error::ChatTemplate(format!("{} has no chat template", self.path().display()))
        })?;
        let tok = self.tokenizer();
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (name(tok.bos_id()), name(tok.eos_id()));
        let render = |msgs: &[Message], tools: Option<&[serde_json::Value]>| {
            if ranges {
                render_with_content_ranges(template, msgs, tools, add_generation_prompt, &bos, &eos)
            } else {
                render_template_with_tools(template, msgs, tools, add_generation_prompt, &bos, &eos)
                    .map(|t| (t, None))
            }
        };
        let has_calls = messages.iter().any(|m| !m.tool_calls.is_empty());
        if template_takes_tools(template) || (tools.is_empty() && !has_calls) {
            let json: Vec<serde_json::Value> = tools.iter().map(Tool::to_json).collect();
            let tools = (!json.is_empty()).then_some(&json[..]);
            return render(messages, tools);
        }
        let format = ToolFormat::of_template(Some(template));
        let mut msgs = messages.to_vec();
        for m in &mut msgs {
            if !m.tool_calls.is_empty() {
                let calls: Vec<String> =
                    m.tool_calls.iter().map(|c| format.write_call(c)).collect();
                if !m.content.is_empty() {
                    m.content.push('\n');
                }
                m.content.push_str(&calls.join("\n"));
                m.tool_calls.clear();
            }
        }
        if !tools.is_empty() {
            let prompt = tools_prompt(tools, format);
            match msgs.first_mut() {
                Some(m) if m.role == "system" => {
                    m.content = format!("{}\n\n{prompt}", m.content);
                }
                _ => msgs.insert(0, Message::system(prompt)),
            }
        }
        render(&msgs, None)
    }

    /// The tokens of a rendered conversation, one BOS at most: the template's own markup is
    /// parsed (special tokens included), message content is text whatever it contains (a
    /// user cannot forge a turn by writing `<|im_end|>`), and roles must be among
    /// [`crate::chat::KNOWN_ROLES`]; `opts` shows tools to the template, or trusts the
    /// messages ([`ChatOptions::parse_special_in_content`]: any role, special-token text in
    /// content parsed into control tokens).
    pub fn chat_tokens(&self, messages: &[Message], opts: ChatOptions<'_>) -> Result<Vec<u32>> {
        let (tools, parse_special_in_content) = (opts.tools, opts.parse_special_in_content);
        let tok = self.tokenizer();
        let mut ids = if parse_special_in_content {
            let text = self.apply_chat_template_with_tools(messages, tools, true)?;
            tok.encode(&text, false, true)?
        } else {
            check_roles(messages)?;
            let (text, ranges) = self.render_chat(messages, tools, true, true)?;
            match ranges {
                Some(r) => tok.encode_with_plain_ranges(&text, false, &r)?,
                None => {
                    // The template rewrites content: safe only if no content holds
                    // special-token text.
                    if let Some(i) = messages
                        .iter()
                        .position(|m| tok.contains_special_text(&m.content))
                    {
                        return Err(Error::InvalidArgument(format!(
                            "message {i} contains special-token text, and this model's chat \
                             template rewrites message content, so it cannot be kept as plain \
                             text; remove it, or opt in to parsing special tokens in content"
                        )));
                    }
                    tok.encode(&text, false, true)?
                }
            }
        };
        if tok.adds_bos() {
            if let Some(b) = tok.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }
}

/// How [`Model::chat_tokens`] (and a chat prompt of a session or batch) renders and tokenizes
/// a conversation.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ChatOptions<'a> {
    /// Tools shown to the template (its native tools block, or our tools prompt).
    pub tools: &'a [Tool],
    /// Trust the messages: any role, and special-token text inside content parsed into
    /// control tokens (the behaviour of `tokenize(apply_chat_template(..), parse_special)`).
    pub parse_special_in_content: bool,
}

impl<'a> ChatOptions<'a> {
    /// Tools shown to the template.
    pub fn with_tools(tools: &'a [Tool]) -> ChatOptions<'a> {
        ChatOptions {
            tools,
            parse_special_in_content: false,
        }
    }

    /// These options with the messages trusted or not
    /// ([`ChatOptions::parse_special_in_content`]).
    pub fn trusting(mut self, parse_special_in_content: bool) -> ChatOptions<'a> {
        self.parse_special_in_content = parse_special_in_content;
        self
    }

    /// Trusted messages ([`ChatOptions::parse_special_in_content`]), no tools.
    pub fn trusted() -> ChatOptions<'static> {
        ChatOptions {
            tools: &[],
            parse_special_in_content: true,
        }
    }
}

impl<'a> From<&'a crate::GenerateOptions> for ChatOptions<'a> {
    /// The tools and trust of a generation's options.
    fn from(o: &'a crate::GenerateOptions) -> ChatOptions<'a> {
        ChatOptions {
            tools: &o.tools,
            parse_special_in_content: o.parse_special_in_content,
        }
    }
}
