//! Multi-turn chat: the conversation and its KV cache survive between turns.
//!
//! Each turn renders the chat template over the whole conversation, tokenizes it, and compares the
//! tokens with those already in the cache. Only the tokens after the common prefix are fed; when
//! the two diverge (a reply re-tokenizes differently than it was generated), the cache is
//! truncated to the common prefix first.

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::generate::{CancelToken, GenerateOptions, Generator, Stats, StopReason};
use crate::kv_cache::KvCache;
use crate::llama::Model;
use crate::sampler::Sampler;
use crate::tokenizer::Tokenizer;

/// A conversation with a model.
pub struct ChatSession<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    template: TemplateRef<'m>,
    messages: Vec<Message>,
    opts: GenerateOptions,
    /// `None` only while a turn is running (the generator owns it) or after a failed turn.
    cache: Option<KvCache>,
    /// The tokens the cache holds, in order.
    cached: Vec<u32>,
    sampler: Option<Sampler>,
    /// The end-of-turn marker of the template, when it is a single token.
    end_of_turn: Option<u32>,
    cancel: CancelToken,
    last_stats: Stats,
    last_stop: Option<StopReason>,
}

impl<'m> ChatSession<'m> {
    /// A new conversation, with an optional system message. Uses the model's chat template
    /// (ChatML when the model has none).
    pub fn new(model: &'m Model, system: Option<&str>, opts: GenerateOptions) -> Result<Self> {
        let tokenizer = chat_tokenizer(model)?;
        let template = TemplateRef::of(model);
        let end_of_turn = end_of_turn_token(template.get(), tokenizer)?;
        let messages = system
            .map(|s| {
                vec![Message {
                    role: "system".into(),
                    content: s.into(),
                }]
            })
            .unwrap_or_default();
        Ok(ChatSession {
            model,
            tokenizer,
            template,
            messages,
            sampler: Some(Sampler::new(opts.sampler.clone())),
            opts,
            cache: Some(model.new_cache()),
            cached: Vec::new(),
            end_of_turn,
            cancel: CancelToken::new(),
            last_stats: Stats::default(),
            last_stop: None,
        })
    }

    /// Sends a user message, streams the reply's text through `on_piece`, and returns the reply.
    /// The reply joins the history. On error the user message is taken back out.
    ///
    /// A reply that fills the context ends there ([`StopReason::ContextFull`]); a conversation
    /// that leaves no room for a reply fails with [`Error::PromptTooLong`] and starts the next
    /// turn from an empty cache.
    pub fn send(&mut self, user: &str, mut on_piece: impl FnMut(&str)) -> Result<String> {
        self.messages.push(Message {
            role: "user".into(),
            content: user.into(),
        });
        match self.run_turn(&mut on_piece) {
            Ok(reply) => {
                self.messages.push(Message {
                    role: "assistant".into(),
                    content: reply.clone(),
                });
                Ok(reply)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }

    fn run_turn(&mut self, on_piece: &mut dyn FnMut(&str)) -> Result<String> {
        self.cancel.reset();
        let rendered = self.template.get().render(&self.messages, true)?;
        let tokens = chat_tokens(
            self.tokenizer.encode(&rendered, true)?,
            self.tokenizer.bos_id(),
        );
        let mut cache = match self.cache.take() {
            Some(c) => c,
            None => {
                // A previous turn failed part-way: start from an empty cache.
                self.cached.clear();
                self.model.new_cache()
            }
        };
        let mut common = common_prefix(&self.cached, &tokens);
        // At least one token must be fed to get logits for the reply.
        if common == tokens.len() {
            common = common.saturating_sub(1);
        }
        self.cached.truncate(common);
        cache.truncate(common);

        let sampler = match self.sampler.take() {
            Some(s) => s,
            None => Sampler::new(self.opts.sampler.clone()),
        };
        let result = Generator::resume(self.model, cache, tokens, common, self.opts.clone());
        let mut generator = match result {
            Ok(g) => g
                .with_sampler(sampler)
                .with_stop_token(self.end_of_turn)
                .with_cancel(self.cancel.clone()),
            Err(e) => {
                // `resume` consumed the cache; the next turn starts afresh.
                self.cached.clear();
                return Err(e);
            }
        };
        let mut reply = String::new();
        for piece in &mut generator {
            let piece = piece?;
            on_piece(&piece.text);
            reply.push_str(&piece.text);
        }
        self.last_stats = generator.stats();
        self.last_stop = generator.stop_reason();
        let (cache, sampler, cached) = generator.into_parts();
        self.cache = Some(cache);
        self.sampler = Some(sampler);
        self.cached = cached;
        Ok(reply)
    }

    /// The conversation so far (system, user and assistant messages).
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// How many tokens the KV cache holds now.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Timings of the last turn; `prompt_tokens` counts only the tokens that turn fed.
    pub fn last_stats(&self) -> Stats {
        self.last_stats
    }

    /// Why the last reply ended.
    pub fn last_stop_reason(&self) -> Option<StopReason> {
        self.last_stop
    }

    /// A handle that stops the running reply before its next token.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Forgets the conversation (keeping the system message) and empties the cache.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.cached.clear();
        if let Some(c) = &mut self.cache {
            c.clear();
        }
    }
}

/// A conversation rendered for a model to reply to ([`chat_prompt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The conversation as the chat template writes it, ending with the assistant's header.
    pub text: String,
    /// Its tokens (special tokens parsed), with one BOS where the model wants one.
    pub tokens: Vec<u32>,
    /// The template's end-of-turn marker, when it is one token: generation should stop there.
    pub end_of_turn: Option<u32>,
}

/// Renders `messages` with the model's chat template (ChatML when the model has none), ready for
/// the assistant's reply, and tokenizes it as [`ChatSession`] does, so that every front end (chat,
/// server, C library) feeds a model the same tokens for the same conversation.
pub fn chat_prompt(model: &Model, messages: &[Message]) -> Result<ChatPrompt> {
    let tokenizer = chat_tokenizer(model)?;
    let template = TemplateRef::of(model);
    let text = template.get().render(messages, true)?;
    let tokens = chat_tokens(tokenizer.encode(&text, true)?, tokenizer.bos_id());
    Ok(ChatPrompt {
        text,
        tokens,
        end_of_turn: end_of_turn_token(template.get(), tokenizer)?,
    })
}

fn chat_tokenizer(model: &Model) -> Result<&Tokenizer> {
    model.tokenizer().ok_or_else(|| {
        Error::InvalidOption("this model has no tokenizer, so it cannot chat".into())
    })
}

/// The template's end-of-turn marker as a token id, when it is exactly one token.
fn end_of_turn_token(template: &ChatTemplate, tokenizer: &Tokenizer) -> Result<Option<u32>> {
    Ok(match template.end_of_turn() {
        Some(marker) => match tokenizer.encode(marker, true)?.as_slice() {
            [id] => Some(*id),
            _ => None,
        },
        None => None,
    })
}

/// The model's template, or a fallback owned by the session.
enum TemplateRef<'m> {
    Model(&'m ChatTemplate),
    Owned(Box<ChatTemplate>),
}

impl<'m> TemplateRef<'m> {
    fn of(model: &'m Model) -> TemplateRef<'m> {
        match model.chat_template() {
            Some(t) => TemplateRef::Model(t),
            None => TemplateRef::Owned(Box::new(ChatTemplate::chatml())),
        }
    }
}

impl TemplateRef<'_> {
    fn get(&self) -> &ChatTemplate {
        match self {
            TemplateRef::Model(t) => t,
            TemplateRef::Owned(t) => t,
        }
    }
}

/// Length of the longest common prefix of two token sequences.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The tokens of a rendered conversation with one BOS: a template that writes the BOS token itself
/// (Gemma, Llama 3) and a tokenizer that adds one would give two, and the model was trained with
/// one.
fn chat_tokens(mut tokens: Vec<u32>, bos: Option<u32>) -> Vec<u32> {
    if bos.is_some() && tokens.len() >= 2 && tokens[0] == tokens[1] && Some(tokens[0]) == bos {
        tokens.remove(0);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::{chat_tokens, common_prefix};

    #[test]
    fn a_conversation_starts_with_one_bos() {
        assert_eq!(chat_tokens(vec![2, 2, 105, 7], Some(2)), [2, 105, 7]);
        assert_eq!(chat_tokens(vec![2, 105, 7], Some(2)), [2, 105, 7]);
        assert_eq!(chat_tokens(vec![5, 5, 7], Some(2)), [5, 5, 7]);
        assert_eq!(chat_tokens(vec![2, 2], None), [2, 2]);
    }

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[9], &[1, 2]), 0);
    }
}
