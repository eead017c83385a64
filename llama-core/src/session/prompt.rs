//! What a generation continues from: [`Prompt`] (borrowed) and [`OwnedPrompt`] (owned, for a
//! caller that keeps it past the borrow: a binding, a server's queue).

use crate::chat::Message;

/// What a generation continues from ([`Session::start`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Prompt<'a> {
    /// Text, tokenized as llama.cpp does for prompts: special tokens parsed, BOS (when the model
    /// asks for one) only on an empty session.
    Text(&'a str),
    /// Token ids, evaluated as they are (may be empty to continue from the current logits).
    Tokens(&'a [u32]),
    /// A conversation rendered with the model's chat template (generation prompt added); the
    /// cached prefix shared with earlier turns is kept and only the rest is evaluated.
    Chat(&'a [Message]),
}

/// A prompt from what a caller holds: `&str`/`&String` ([`Prompt::Text`]), token ids as a
/// slice, an array or a `Vec` ([`Prompt::Tokens`]), messages as a slice or a `Vec`
/// ([`Prompt::Chat`]), or an [`OwnedPrompt`].
macro_rules! prompt_from {
    ($([$($g:tt)*] $t:ty => $variant:ident;)*) => {$(
        impl<'a, $($g)*> From<&'a $t> for Prompt<'a> {
            fn from(v: &'a $t) -> Prompt<'a> {
                Prompt::$variant(v)
            }
        }
    )*};
}
prompt_from! {
    [] str => Text;
    [] String => Text;
    [] [u32] => Tokens;
    [const N: usize] [u32; N] => Tokens;
    [] Vec<u32> => Tokens;
    [] [Message] => Chat;
    [const N: usize] [Message; N] => Chat;
    [] Vec<Message> => Chat;
}

impl<'a> From<&'a OwnedPrompt> for Prompt<'a> {
    fn from(p: &'a OwnedPrompt) -> Prompt<'a> {
        p.as_prompt()
    }
}

/// An owned [`Prompt`]: what a binding or a server keeps while a request waits (the BOS rule
/// and chat prefix reuse apply when it is used, through [`OwnedPrompt::as_prompt`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedPrompt {
    /// See [`Prompt::Text`].
    Text(String),
    /// See [`Prompt::Tokens`].
    Tokens(Vec<u32>),
    /// See [`Prompt::Chat`].
    Chat(Vec<Message>),
}

impl OwnedPrompt {
    /// The borrowed form the session and batch calls take.
    pub fn as_prompt(&self) -> Prompt<'_> {
        match self {
            OwnedPrompt::Text(t) => Prompt::Text(t),
            OwnedPrompt::Tokens(t) => Prompt::Tokens(t),
            OwnedPrompt::Chat(m) => Prompt::Chat(m),
        }
    }

    /// The request field a prompt of this kind comes from in OpenAI's API (`messages` for a
    /// chat, `prompt` otherwise), for errors that name it.
    pub fn field(&self) -> &'static str {
        match self {
            OwnedPrompt::Chat(_) => "messages",
            _ => "prompt",
        }
    }
}

impl From<Prompt<'_>> for OwnedPrompt {
    fn from(p: Prompt<'_>) -> OwnedPrompt {
        match p {
            Prompt::Text(t) => OwnedPrompt::Text(t.to_string()),
            Prompt::Tokens(t) => OwnedPrompt::Tokens(t.to_vec()),
            Prompt::Chat(m) => OwnedPrompt::Chat(m.to_vec()),
        }
    }
}
