//! Chat templates: the model's Jinja `tokenizer.chat_template`, rendered with `minijinja` the way
//! Hugging Face's `apply_chat_template` renders it, with ChatML as the fallback.

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::Serialize;

use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The ChatML template, used when a model carries none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// End-of-turn markers, searched for in the template source.
const TURN_ENDS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
];

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A compiled chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    end_of_turn: Option<String>,
    /// Where the source came from (`file: key`), prefixed to errors; empty for a given source.
    origin: String,
}

const TEMPLATE_NAME: &str = "chat";

/// Template instructions one render may run: a long conversation through a real template takes
/// a few thousand per message; an endless or exponential loop runs out and fails.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Nesting depth (loops, macro calls, includes) a render may reach, well inside the stack.
const TEMPLATE_RECURSION_LIMIT: usize = 200;

/// Most bytes one render may produce.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

impl ChatTemplate {
    /// Compiles Jinja `source`; `bos_token`/`eos_token` are the strings the template may insert.
    /// Rendering is bounded: [`TEMPLATE_FUEL`] instructions, a recursion limit, and
    /// [`MAX_RENDERED_BYTES`] of output; past any of them it fails with [`Error::Template`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        Self::compile(source, bos_token, eos_token, String::new())
    }

    /// [`ChatTemplate::new`], with errors prefixed by `origin` (the file and key of the source).
    fn compile(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        origin: String,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        // Hugging Face renders chat templates with these two on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| template_error(&origin, e))?;
        let end_of_turn = TURN_ENDS
            .iter()
            .find(|m| source.contains(*m))
            .map(|m| m.to_string())
            .or_else(|| {
                (!eos_token.is_empty() && source.contains("eos_token"))
                    .then(|| eos_token.to_string())
            });
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            end_of_turn,
            origin,
        })
    }

    /// The ChatML template.
    pub fn chatml() -> ChatTemplate {
        // The constant template compiles; if it somehow did not, an empty environment would only
        // fail at render time with a template error.
        ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>").unwrap_or_else(|_| ChatTemplate {
            env: Environment::new(),
            bos_token: String::new(),
            eos_token: String::new(),
            end_of_turn: Some("<|im_end|>".to_string()),
            origin: String::new(),
        })
    }

    /// The template in `tokenizer.chat_template`, or ChatML when the file has none.
    pub fn from_gguf(file: &GgufFile, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let Some(source) = file.metadata("tokenizer.chat_template") else {
            return Ok(ChatTemplate::chatml());
        };
        let source = source
            .as_str()
            .ok_or_else(|| file.meta_error("tokenizer.chat_template", "expected a string"))?;
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_str(id))
                .unwrap_or("")
                .to_string()
        };
        ChatTemplate::compile(
            source,
            &text(tokenizer.bos_id()),
            &text(tokenizer.eos_id()),
            format!(
                "{}: metadata 'tokenizer.chat_template'",
                file.path().display()
            ),
        )
    }

    /// The template in a Hugging Face folder's `tokenizer_config.json` (`chat_template`: a string,
    /// or a list of `{name, template}` of which `default` is used), or ChatML when there is none.
    pub fn from_hf_folder(dir: &std::path::Path, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| Error::BadFile {
                path: path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::Io { path, source }),
        };
        let source = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => return Ok(ChatTemplate::chatml()),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::BadFile {
                    path: path.clone(),
                    reason: "chat_template is a list without a 'default' template".into(),
                })?,
            Some(_) => {
                return Err(Error::BadFile {
                    path,
                    reason: "chat_template is neither a string nor a list".into(),
                })
            }
        };
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_str(id))
                .unwrap_or("")
                .to_string()
        };
        ChatTemplate::compile(
            &source,
            &text(tokenizer.bos_id()),
            &text(tokenizer.eos_id()),
            format!("{}: chat_template", path.display()),
        )
    }

    /// Renders the conversation; with `add_generation_prompt`, ends with the assistant's header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let error = |e| template_error(&self.origin, e);
        let template = self.env.get_template(TEMPLATE_NAME).map_err(error)?;
        let mut out = CappedOutput(Vec::new());
        template
            .render_captured_to(
                minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                },
                &mut out,
            )
            .map_err(error)?;
        String::from_utf8(out.0).map_err(|e| {
            template_error(
                &self.origin,
                minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()),
            )
        })
    }

    /// The text that ends an assistant turn (`<|im_end|>`, `<|eot_id|>`, ...), if known.
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }
}

/// Rendered text, refusing to grow past [`MAX_RENDERED_BYTES`].
struct CappedOutput(Vec<u8>);

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!(
                "the rendered text exceeds {MAX_RENDERED_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An [`Error::Template`] with the whole chain of causes, after `origin` when there is one.
fn template_error(origin: &str, e: minijinja::Error) -> Error {
    let mut msg = if origin.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    };
    msg.push_str(&e.to_string());
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Template(msg)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn tojson(value: Value) -> std::result::Result<Value, minijinja::Error> {
    serde_json::to_string(&value)
        .map(Value::from_safe_string)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// The Python string, dict and list methods Hugging Face templates call.
fn python_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let arg_str = |i: usize| args.get(i).and_then(Value::as_str);
    let unknown = || Err(minijinja::Error::from(ErrorKind::UnknownMethod));
    if let Some(s) = value.as_str() {
        let chars: Option<Vec<char>> = arg_str(0).map(|c| c.chars().collect());
        let strip = |s: &str, left: bool, right: bool| -> String {
            let is_strip = |c: char| {
                chars
                    .as_ref()
                    .map_or(c.is_whitespace(), |set| set.contains(&c))
            };
            let s = if left {
                s.trim_start_matches(is_strip)
            } else {
                s
            };
            let s = if right {
                s.trim_end_matches(is_strip)
            } else {
                s
            };
            s.to_string()
        };
        return Ok(match method {
            "strip" => Value::from(strip(s, true, true)),
            "lstrip" => Value::from(strip(s, true, false)),
            "rstrip" => Value::from(strip(s, false, true)),
            "lower" => Value::from(s.to_lowercase()),
            "upper" => Value::from(s.to_uppercase()),
            "title" | "capitalize" => {
                let mut c = s.chars();
                let first: String = c
                    .next()
                    .map(|f| f.to_uppercase().collect())
                    .unwrap_or_default();
                Value::from(first + &c.as_str().to_lowercase())
            }
            "startswith" => Value::from(arg_str(0).is_some_and(|p| s.starts_with(p))),
            "endswith" => Value::from(arg_str(0).is_some_and(|p| s.ends_with(p))),
            "replace" => match (arg_str(0), arg_str(1)) {
                (Some(a), Some(b)) => Value::from(s.replace(a, b)),
                _ => return unknown(),
            },
            "split" => {
                let parts: Vec<Value> = match arg_str(0) {
                    Some(sep) => s.split(sep).map(Value::from).collect(),
                    None => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "find" => Value::from(arg_str(0).and_then(|p| s.find(p)).map_or(-1, |i| i as i64)),
            "count" => Value::from(arg_str(0).map_or(0, |p| s.matches(p).count())),
            _ => return unknown(),
        });
    }
    match (value.kind(), method) {
        (ValueKind::Map, "items") => {
            let pairs: Vec<Value> = value
                .try_iter()?
                .map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    Value::from(vec![k, v])
                })
                .collect();
            Ok(Value::from(pairs))
        }
        (ValueKind::Map, "keys") => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
        (ValueKind::Map, "values") => {
            let vals: Vec<Value> = value
                .try_iter()?
                .map(|k| value.get_item(&k).unwrap_or_default())
                .collect();
            Ok(Value::from(vals))
        }
        (ValueKind::Map, "get") => {
            let key = args.first().cloned().unwrap_or_default();
            let v = value.get_item(&key)?;
            Ok(if v.is_undefined() || v.is_none() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                v
            })
        }
        _ => unknown(),
    }
}

/// Python's `strftime` for the current UTC time, for the directives templates use.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_time(secs, &format)
}

fn format_time(secs: u64, format: &str) -> String {
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
    let days = secs / 86400;
    let (h, m, s) = (secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    let weekday = DAYS[(days % 7) as usize];
    let mut out = String::new();
    let mut it = format.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') if it.clone().next() == Some('d') => {
                it.next();
                out.push_str(&day.to_string());
            }
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(t.end_of_turn(), Some("<|im_end|>"));
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let out = t
            .render(
                &[
                    Message::new("user", "a"),
                    Message::new("assistant", "b"),
                    Message::new("user", "c"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_functions() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}|{{ m.content.split(',')|length }}|{{ m.content.replace(' ', '_') }}{% endfor %}{% set d = {'a': 1} %}{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}{{ d.get('b', 7) }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[Message::new("user", "  x, y ")], false).unwrap();
        assert_eq!(out, "<s>X, Y|True|2|__x,_y_a=17");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-23 14:05:09 UTC, a Tuesday.
        assert_eq!(
            format_time(1_721_743_509, "%d %b %Y %H:%M:%S %A %%"),
            "23 Jul 2024 14:05:09 Tuesday %"
        );
        assert_eq!(format_time(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        assert!(!strftime_now("%Y".into()).is_empty());
    }
}
