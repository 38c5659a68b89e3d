//! GPT-2's byte-level alphabet: the reversible map between bytes and printable characters.
//!
//! A byte-level BPE `tokenizer.json` stores each token's raw bytes as a string in which every
//! byte is replaced by one character (printable ASCII and most Latin-1 map to themselves, the
//! other 68 bytes to U+0100..U+0143). To share one decoder with the tiktoken format, tokens are
//! mapped back to their raw bytes with [`char_to_byte`].

/// Number of bytes that GPT-2 moves to U+0100.. (256 minus the 188 self-mapped ones).
const MOVED: usize = 68;

/// `BYTE_TO_CHAR[b]` is the code point GPT-2 assigns to byte `b`.
const BYTE_TO_CHAR: [u32; 256] = build_forward();

/// `MOVED_TO_BYTE[cp - 0x100]` is the byte behind code point `cp` in U+0100..U+0143.
const MOVED_TO_BYTE: [u8; MOVED] = build_inverse();

const fn build_forward() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut moved = 0;
    let mut b = 0;
    while b < 256 {
        table[b] = if is_self_mapped(b as u8) {
            b as u32
        } else {
            moved += 1;
            0xFF + moved
        };
        b += 1;
    }
    table
}

const fn build_inverse() -> [u8; MOVED] {
    let mut table = [0u8; MOVED];
    let mut moved = 0;
    let mut b = 0;
    while b < 256 {
        if !is_self_mapped(b as u8) {
            table[moved] = b as u8;
            moved += 1;
        }
        b += 1;
    }
    table
}

/// The character GPT-2's table assigns to `byte` (the `bytes_to_unicode` function of GPT-2,
/// also used by the `tokenizers` crate's `ByteLevel`).
pub fn byte_to_char(byte: u8) -> char {
    char::from_u32(BYTE_TO_CHAR[usize::from(byte)]).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The byte that `c` stands for in GPT-2's table, `None` if `c` is not in the table.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x100 {
        let b = cp as u8;
        return is_self_mapped(b).then_some(b);
    }
    MOVED_TO_BYTE
        .get(usize::try_from(cp - 0x100).ok()?)
        .copied()
}

/// The raw bytes of a byte-level token string, `None` if a character is not in the table.
pub fn token_to_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// Bytes that GPT-2 keeps as the same code point: `!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`.
const fn is_self_mapped(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_matches_gpt2() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        assert_eq!(char_to_byte('Ń'), Some(0xAD));
        assert_eq!(char_to_byte('ń'), None);
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(token_to_bytes("ĠĊa"), Some(b" \na".to_vec()));
    }
}
