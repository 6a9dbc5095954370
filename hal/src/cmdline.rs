//! The kernel command line (`/chosen/bootargs`, QEMU `-append`) as `key=value` parameters.
//!
//! Like Linux, parameters are separated by spaces and a module's parameter is written
//! `module.param=value` (`test_vmalloc.run_test_mask=7`). A bare word is a flag (`value`
//! is empty). Nothing here allocates: the command line is borrowed from the device tree.

/// One `key=value` (or bare `key`) parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param<'a> {
    /// Everything before the first `=`.
    pub key: &'a str,
    /// Everything after the first `=` (empty for a bare flag).
    pub value: &'a str,
}

/// Why a parameter could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError {
    /// `=value` with no key, or a key with characters other than `[A-Za-z0-9_.-]`.
    Malformed,
    /// The value does not parse as the type the parameter wants.
    BadValue,
}

impl core::fmt::Display for ParamError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ParamError::Malformed => "malformed parameter (no key, or a key outside [A-Za-z0-9_.-])",
            ParamError::BadValue => "the value does not parse as the parameter's type",
        })
    }
}

impl core::error::Error for ParamError {}

/// A borrowed command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommandLine<'a> {
    raw: &'a str,
}

impl<'a> CommandLine<'a> {
    /// Wraps a raw command line.
    pub const fn new(raw: &'a str) -> Self {
        Self { raw }
    }

    /// The command line as given.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Every parameter in order, malformed ones as errors carrying the word.
    pub fn params(&self) -> impl Iterator<Item = Result<Param<'a>, &'a str>> + 'a {
        self.raw.split_ascii_whitespace().map(|word| {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let key_ok = !key.is_empty()
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
            if key_ok {
                Ok(Param { key, value })
            } else {
                Err(word)
            }
        })
    }

    /// The value of the last well-formed parameter named `key` (the last one wins, as in
    /// Linux).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.params().filter_map(Result::ok).filter(|p| p.key == key).last().map(|p| p.value)
    }

    /// `key` parsed as an unsigned number (decimal, or hex with `0x`).
    ///
    /// # Errors
    /// [`ParamError::BadValue`] when the parameter is present but not a number.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ParamError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_u64(v).map(Some).ok_or(ParamError::BadValue),
        }
    }

    /// `key` as a boolean: `1`, `y`, `yes`, `on`, `true` or a bare flag are true;
    /// `0`, `n`, `no`, `off`, `false` are false.
    ///
    /// # Errors
    /// [`ParamError::BadValue`] for any other value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ParamError> {
        match self.get(key) {
            None => Ok(None),
            Some("" | "1" | "y" | "yes" | "on" | "true") => Ok(Some(true)),
            Some("0" | "n" | "no" | "off" | "false") => Ok(Some(false)),
            Some(_) => Err(ParamError::BadValue),
        }
    }
}

/// Parses a decimal or `0x` hexadecimal number, with optional `_` separators.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in digits.chars().filter(|&c| c != '_') {
        v = v.checked_mul(radix)?.checked_add(c.to_digit(radix as u32)? as u64)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linux_style_parameters() {
        let c = CommandLine::new("  test_vmalloc.run_test_mask=7 shell quiet=0 x=1 x=2 =bad b@d=1");
        let params: Vec<_> = c.params().collect();
        assert_eq!(params.len(), 7);
        assert_eq!(c.get("test_vmalloc.run_test_mask"), Some("7"));
        assert_eq!(c.get_u64("test_vmalloc.run_test_mask"), Ok(Some(7)));
        assert_eq!(c.get_bool("shell"), Ok(Some(true)));
        assert_eq!(c.get_bool("quiet"), Ok(Some(false)));
        assert_eq!(c.get("x"), Some("2"));
        assert_eq!(params[5], Err("=bad"));
        assert_eq!(params[6], Err("b@d=1"));
        assert_eq!(c.get_u64("missing"), Ok(None));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0x1000"), Some(4096));
        assert_eq!(parse_u64("1_000_000"), Some(1_000_000));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("12a"), None);
        let c = CommandLine::new("n=abc");
        assert_eq!(c.get_u64("n"), Err(ParamError::BadValue));
    }
}
