//! TE data (defined in `testenv-proto`) and the command output that explains a failed one.

pub use testenv_proto::tedata::*;

/// The last `max` bytes of a command's output, on a character boundary.
pub fn tail(output: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("héllo world".as_bytes(), 5), "world");
    }
}
