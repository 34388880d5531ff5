//! How bitsandbytes' native CPU kernel (0.50) picks an 8-bit code for a normalised value when
//! it quantizes the 4-bit scales: not an exact nearest-code search but a 65536-entry lookup
//! table. `[-1, 1]` is cut into 65536 evenly spaced sample points, each sample is given the
//! code nearest to it (by the f32 midpoints between codes), and a value takes the entry of
//! the sample it rounds to. Near a midpoint this can pick the neighbour of the exact nearest
//! code (about 1 value in 500), so to be bit-exact we build the same table with the same f32
//! arithmetic.

/// Entries in the table.
const LUT_SIZE: usize = 65536;

/// The code index for every sample point of `[-1, 1]`.
pub(crate) struct CodeLut {
    lut: Vec<u8>,
}

impl CodeLut {
    /// Build the table for a sorted 256-entry `code` spanning `[-1, 1]`.
    pub(crate) fn new(code: &[f32; 256]) -> Self {
        let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; LUT_SIZE];
        let mut code_idx = 0;
        for (i, entry) in lut.iter_mut().enumerate() {
            let sample = -1.0 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while code_idx < midpoints.len() && midpoints[code_idx] < sample {
                code_idx += 1;
            }
            *entry = code_idx as u8;
        }
        CodeLut { lut }
    }

    /// The code for `normed` (clamped to `[-1, 1]`): the entry of the nearest sample point.
    #[inline]
    pub(crate) fn code_of(&self, normed: f32) -> u8 {
        let v = normed.clamp(-1.0, 1.0);
        let sample = (v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5;
        self.lut[sample as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic_map;

    /// Codes with room around them (gaps wider than a few samples) map to themselves.
    #[test]
    fn well_separated_codes_map_to_themselves() {
        let code = dynamic_map();
        let lut = CodeLut::new(&code);
        let width = 2.0 / (LUT_SIZE - 1) as f32;
        let mut checked = 0;
        for k in 1..255 {
            if code[k] - code[k - 1] > 4.0 * width && code[k + 1] - code[k] > 4.0 * width {
                assert_eq!(lut.code_of(code[k]) as usize, k, "code {k} = {}", code[k]);
                checked += 1;
            }
        }
        assert!(checked > 150, "{checked}");
        assert_eq!(lut.code_of(-2.0), 0);
        assert_eq!(lut.code_of(2.0), 255);
    }

    /// A value bitsandbytes 0.50.2 codes as 162 though code 161 is nearer (measured with its
    /// `quantize_blockwise`): the table, not an exact search, decides.
    #[test]
    fn agrees_with_bitsandbytes_next_to_a_midpoint() {
        let code = dynamic_map();
        let z = f32::from_bits(0x3c97013c); // 0.018433206
        assert!((z - code[161]).abs() < (z - code[162]).abs());
        assert_eq!(CodeLut::new(&code).code_of(z), 162);
    }
}
