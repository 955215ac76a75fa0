//! The option structs C fills in: how to load a model and how to generate.

use lutra_runtime::generate::GenerateOptions;
use lutra_runtime::sampler::SamplerConfig;

use crate::error::{ApiError, ApiResult};

/// How to load a model. Zero in a field means its default; `lutra_load_options_default()` gives
/// all defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct lutra_load_options {
    /// Worker threads of the matrix kernels; 0: one per core.
    pub threads: u32,
    /// Context length (tokens one conversation or completion may hold); 0: the model's own.
    pub context_length: u32,
    /// Sequences decoded together in one batch (requests of different threads share each forward
    /// pass); 0: 4. Each has its own KV cache, allocated as it fills.
    pub parallel: u32,
}

/// The default load options (every field 0).
#[no_mangle]
pub extern "C" fn lutra_load_options_default() -> lutra_load_options {
    lutra_load_options::default()
}

/// Sequences batched together when `parallel` is 0.
pub(crate) const DEFAULT_PARALLEL: usize = 4;

/// How to generate: the length and llama.cpp's sampling settings. Start from
/// `lutra_generate_params_default()` and change the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct lutra_generate_params {
    /// Most tokens to generate, at least 1 (default 256). Generation also ends at the model's end
    /// of turn and when the context is full.
    pub max_tokens: u32,
    /// Logits are divided by this before the draw; 0 or less: greedy, always the most likely
    /// token (default 0.8).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables (default 40).
    pub top_k: u32,
    /// Keep the most likely tokens whose probabilities sum to `top_p`, in [0, 1]; 1 disables
    /// (default 0.95).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1]; 0 disables
    /// (default 0.05).
    pub min_p: f32,
    /// Divide positive and multiply negative logits of recent tokens by this, above 0; 1 disables
    /// (default 1).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at (default 64).
    pub repeat_last_n: u32,
    /// Whether `seed` is used; when false, each request draws a random seed (default false).
    pub has_seed: bool,
    /// Seed of the sampler's random numbers when `has_seed` is true: the same seed, prompt and
    /// settings give the same text.
    pub seed: u64,
}

/// The default generation parameters (llama.cpp's sampling defaults, 256 tokens, random seed).
#[no_mangle]
pub extern "C" fn lutra_generate_params_default() -> lutra_generate_params {
    lutra_generate_params::default()
}

impl Default for lutra_generate_params {
    fn default() -> lutra_generate_params {
        let sampler = SamplerConfig::default();
        lutra_generate_params {
            max_tokens: GenerateOptions::default().max_tokens as u32,
            temperature: sampler.temperature,
            top_k: sampler.top_k as u32,
            top_p: sampler.top_p,
            min_p: sampler.min_p,
            repeat_penalty: sampler.repeat_penalty,
            repeat_last_n: sampler.repeat_last_n as u32,
            has_seed: false,
            seed: 0,
        }
    }
}

impl lutra_generate_params {
    /// The runtime's options for these parameters, or an error naming the first bad field.
    pub(crate) fn options(&self) -> ApiResult<GenerateOptions> {
        if self.max_tokens == 0 {
            return Err("max_tokens is 0; it must be at least 1".into());
        }
        if self.temperature.is_nan() {
            return Err("temperature is NaN".into());
        }
        check_unit("top_p", self.top_p)?;
        check_unit("min_p", self.min_p)?;
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(ApiError(format!(
                "repeat_penalty is {}; it must be a finite number above 0 (1 disables it)",
                self.repeat_penalty
            )));
        }
        Ok(GenerateOptions {
            max_tokens: self.max_tokens as usize,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k as usize,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n as usize,
                seed: self.has_seed.then_some(self.seed),
            },
            ..GenerateOptions::default()
        })
    }
}

/// Checks that a probability setting lies in [0, 1].
fn check_unit(name: &str, value: f32) -> ApiResult<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ApiError(format!(
            "{name} is {value}; it must lie in [0, 1]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::{lutra_generate_params, lutra_generate_params_default};

    #[test]
    fn defaults_convert_to_the_runtime_defaults() {
        let opts = lutra_generate_params_default().options().unwrap();
        assert_eq!(opts, lutra_runtime::generate::GenerateOptions::default());
    }

    #[test]
    fn a_seed_is_used_only_when_flagged() {
        let mut p = lutra_generate_params_default();
        p.seed = 42;
        assert_eq!(p.options().unwrap().sampler.seed, None);
        p.has_seed = true;
        assert_eq!(p.options().unwrap().sampler.seed, Some(42));
        p.seed = 0;
        assert_eq!(p.options().unwrap().sampler.seed, Some(0));
    }

    #[test]
    fn bad_fields_are_named() {
        type Spoil = fn(&mut lutra_generate_params);
        let bad: [(&str, Spoil); 6] = [
            ("max_tokens", |p| p.max_tokens = 0),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_p", |p| p.top_p = 1.5),
            ("min_p", |p| p.min_p = -0.1),
            ("min_p", |p| p.min_p = f32::NAN),
            ("repeat_penalty", |p| p.repeat_penalty = 0.0),
        ];
        for (field, spoil) in bad {
            let mut p = lutra_generate_params_default();
            spoil(&mut p);
            let err = p.options().unwrap_err();
            assert!(err.0.starts_with(field), "{field}: {}", err.0);
        }
    }
}
