//! Byte sizes on the command line and in human output.

const UNITS: [(&str, &str, u32); 4] = [("k", "kib", 10), ("m", "mib", 20), ("g", "gib", 30), ("t", "tib", 40)];

/// Parses a SIZE argument: plain bytes, or a whole number followed by a
/// binary unit (K/KiB, M/MiB, G/GiB, T/TiB, any letter case).
///
/// `flag` names the argument in the error so the user knows which of
/// several sizes was wrong. The 4096 multiple rule is left to the server on
/// purpose: it owns that rule, and its message is the one users should see.
pub fn parse_size(flag: &str, input: &str) -> Result<u64, String> {
    let expected = "expected bytes or a number with KiB/MiB/GiB/TiB";
    let split = input.find(|c: char| !c.is_ascii_digit()).unwrap_or(input.len());
    let (digits, suffix) = input.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid {flag} \"{input}\": {expected}"));
    }
    if suffix.starts_with(['.', ',']) {
        return Err(format!(
            "invalid {flag} \"{input}\": fractional sizes are not supported, use a smaller unit"
        ));
    }
    let suffix_lower = suffix.to_ascii_lowercase();
    let shift = if suffix_lower.is_empty() {
        0
    } else {
        UNITS
            .iter()
            .find(|(short, long, _)| suffix_lower == *short || suffix_lower == *long)
            .map(|&(_, _, shift)| shift)
            .ok_or_else(|| format!("invalid {flag} \"{input}\": {expected}"))?
    };
    let too_large = || format!("invalid {flag} \"{input}\": too large (at most {} bytes)", u64::MAX);
    // Only digits are left, so overflow is the one way this parse can fail.
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    let bytes = number.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    if bytes == 0 {
        return Err(format!("invalid {flag} \"{input}\": must be greater than zero"));
    }
    Ok(bytes)
}

/// Clap value parser for `--size`.
pub fn size_arg(input: &str) -> Result<u64, String> {
    parse_size("--size", input)
}

/// Clap value parser for `--volume-size`.
pub fn volume_size_arg(input: &str) -> Result<u64, String> {
    parse_size("--volume-size", input)
}

/// Rounds a byte count to one decimal in the largest binary unit that keeps
/// it at least 1, e.g. "1.0 GiB"; below 1 KiB it is exact ("512 B").
pub fn human_size(bytes: u64) -> String {
    const NAMES: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    while unit + 1 < NAMES.len() && bytes >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    // Precision loss in the f64 is far below the one decimal shown.
    let value = bytes as f64 / (1u64 << (10 * (unit + 1))) as f64;
    format!("{value:.1} {}", NAMES[unit])
}

/// "1073741824 (1.0 GiB)": exact for scripts reading the human output, and
/// readable.
pub fn bytes_and_human(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{bytes} ({})", human_size(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_bytes_and_units() {
        let cases = [
            ("4096", 4096),
            ("1", 1),
            ("1K", 1024),
            ("1k", 1024),
            ("2KiB", 2048),
            ("2kib", 2048),
            ("2KIB", 2048),
            ("512MiB", 512 << 20),
            ("512m", 512 << 20),
            ("1G", 1 << 30),
            ("10GiB", 10 << 30),
            ("3T", 3 << 40),
            ("3TiB", 3 << 40),
            ("007M", 7 << 20),
            ("16777215TiB", 16_777_215u64 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size("--size", input), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn rejects_garbage_naming_the_argument() {
        for input in [
            "", "12XB", "GiB", "-1", "+1", " 1", "1 ", "1 GiB", "1KB", "1B", "1Gi", "0x10", "1e9", "1_000", "１",
        ] {
            let err = parse_size("--size", input).expect_err(input);
            assert_eq!(
                err,
                format!("invalid --size \"{input}\": expected bytes or a number with KiB/MiB/GiB/TiB")
            );
        }
    }

    #[test]
    fn rejects_zero_fractions_and_overflow() {
        for input in ["0", "0GiB", "000"] {
            let err = parse_size("--volume-size", input).expect_err(input);
            assert!(err.starts_with("invalid --volume-size"), "{err}");
            assert!(err.contains("greater than zero"), "{err}");
        }
        for input in ["1.5GiB", "0.5", "1,5G"] {
            let err = parse_size("--size", input).expect_err(input);
            assert!(err.contains("fractional"), "{err}");
        }
        for input in ["18446744073709551616", "16777216TiB", "99999999999999999999G"] {
            let err = parse_size("--size", input).expect_err(input);
            assert!(err.contains("too large"), "{err}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(10 << 30), "10.0 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
        assert_eq!(bytes_and_human(1 << 30), "1073741824 (1.0 GiB)");
        assert_eq!(bytes_and_human(512), "512 B");
    }
}
