//! A minibatch as one PNG: a grid of its images, each with its label
//! drawn underneath in a built-in 5×7 digit font, so the file reads alone
//! (`GET /minibatch.png`, and `minibatchd get --png FILE` on the client).
//!
//! Layout (every length times `scale`): a `GAP`-pixel border of level
//! [`GAP_LEVEL`] around and between cells; cell `i` sits in column
//! `i % cols` and row `i / cols` of a grid `cols = ceil(sqrt(n))` wide;
//! a cell is the image (H×W, nearest-neighbour scaled) over a label strip
//! [`STRIP`] pixels high of level [`STRIP_LEVEL`], the label's digits in
//! level [`INK`], one pixel below the image, centred. Pixels: float x
//! (float32/64/16, bfloat16) is `round(v × 255)` clamped to 0–255, uint8
//! x is as stored. Grayscale PNG for one channel, RGB for three.
use crate::store::DType;

/// Most images one PNG shows: 256 is a 16×16 grid, already more than a
/// screen shows at a readable size; a larger minibatch is seen by index.
pub const MAX_IMAGES: usize = 256;
/// Most output pixels: 4,194,304 (12 MiB of RGB rows held while encoding,
/// ~40 ms of deflate here). 256 MNIST digits at the default scale are
/// 960×1,248 = 1.2 Mpx, 256 CIFAR images 1,088×1,376 = 1.5 Mpx.
pub const MAX_PIXELS: usize = 1 << 22;
/// Largest `scale`: 8 makes a 28×28 digit 224 pixels wide.
pub const MAX_SCALE: u32 = 8;
/// Default `scale`: 2 makes the 5×7 label digits readable unzoomed.
pub const DEFAULT_SCALE: u32 = 2;
/// Renders running at once on the daemon; more wait. Each takes a core
/// for up to ~50 ms, and the daemon's cores are for serving minibatches.
pub const RENDER_SLOTS: usize = 2;
/// Border around and between cells, before scaling.
pub const GAP: usize = 2;
/// Height of the label strip under each image, before scaling: 1 pixel
/// above and below the 7-pixel digits.
pub const STRIP: usize = 9;
/// Level of the border.
pub const GAP_LEVEL: u8 = 64;
/// Level of the label strip's background.
pub const STRIP_LEVEL: u8 = 0;
/// Level of the label's digits.
pub const INK: u8 = 255;

/// How an example's values are pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One channel: `[H*W]` (a square), `[H, W]`, `[1, H, W]`, `[H, W, 1]`.
    Gray,
    /// `[3, H, W]`, or `[3*H*W]` with H = W (CIFAR's flat rows).
    Chw,
    /// `[H, W, 3]`.
    Hwc,
}

/// An example's image shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub h: usize,
    pub w: usize,
    pub layout: Layout,
}

impl Geometry {
    /// Channels in the PNG: 1 or 3.
    pub fn channels(&self) -> usize {
        match self.layout {
            Layout::Gray => 1,
            _ => 3,
        }
    }
}

fn square_side(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r >= 2 && r.checked_mul(r) == Some(n)).then_some(r)
}

/// The image shape of examples of shape `example` (x's shape without its
/// first dimension), or why they are not images.
pub fn geometry(example: &[usize]) -> Result<Geometry, String> {
    let g = |h, w, layout| Some(Geometry { h, w, layout });
    let found = match *example {
        [n] => square_side(n)
            .and_then(|s| g(s, s, Layout::Gray))
            .or_else(|| {
                (n % 3 == 0)
                    .then(|| square_side(n / 3))
                    .flatten()
                    .and_then(|s| g(s, s, Layout::Chw))
            }),
        [h, w] => g(h, w, Layout::Gray),
        [1, h, w] | [h, w, 1] => g(h, w, Layout::Gray),
        [3, h, w] => g(h, w, Layout::Chw),
        [h, w, 3] => g(h, w, Layout::Hwc),
        _ => None,
    };
    found.filter(|g| g.h > 0 && g.w > 0).ok_or_else(|| {
        format!(
            "examples of shape {example:?} are not images: the viewer draws [H*W] (a square), \
             [3*S*S] (CIFAR's rows), [H, W], [1, H, W], [H, W, 1] (grayscale), [3, H, W] or \
             [H, W, 3] (RGB)"
        )
    })
}

/// Where `n` images of `geom` go at `scale` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub n: usize,
    pub cols: usize,
    pub rows: usize,
    pub scale: usize,
    pub geom: Geometry,
}

impl Grid {
    /// The grid, or why it is refused: no images, more than
    /// [`MAX_IMAGES`], a scale outside 1..=[`MAX_SCALE`], or more than
    /// [`MAX_PIXELS`] pixels.
    pub fn new(n: usize, geom: Geometry, scale: u32) -> Result<Grid, String> {
        if n == 0 {
            return Err("the minibatch holds no examples".into());
        }
        if n > MAX_IMAGES {
            return Err(format!(
                "{n} images exceed the {MAX_IMAGES} one PNG shows: ask for a smaller size"
            ));
        }
        if !(1..=MAX_SCALE).contains(&scale) {
            return Err(format!("scale {scale} is not within 1..={MAX_SCALE}"));
        }
        let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
        let grid = Grid {
            n,
            cols,
            rows: n.div_ceil(cols),
            scale: scale as usize,
            geom,
        };
        match grid.pixels() {
            Some(p) if p <= MAX_PIXELS => Ok(grid),
            _ => Err(format!(
                "{n} images of {}×{} at scale {scale} would be {}×{} pixels, over the {MAX_PIXELS} \
                 one PNG may have: ask for fewer images or a smaller scale",
                geom.h,
                geom.w,
                grid.width().map_or("?".into(), |v| v.to_string()),
                grid.height().map_or("?".into(), |v| v.to_string()),
            )),
        }
    }

    fn cell_w(&self) -> Option<usize> {
        self.geom.w.checked_mul(self.scale)
    }

    fn cell_h(&self) -> Option<usize> {
        self.geom.h.checked_mul(self.scale)
    }

    /// Image width in pixels (`None`: it overflows).
    pub fn width(&self) -> Option<usize> {
        let pitch = self.cell_w()?.checked_add(GAP * self.scale)?;
        pitch.checked_mul(self.cols)?.checked_add(GAP * self.scale)
    }

    /// Image height in pixels (`None`: it overflows).
    pub fn height(&self) -> Option<usize> {
        let pitch = self.cell_h()?.checked_add((STRIP + GAP) * self.scale)?;
        pitch.checked_mul(self.rows)?.checked_add(GAP * self.scale)
    }

    fn pixels(&self) -> Option<usize> {
        self.width()?.checked_mul(self.height()?)
    }

    /// Top-left pixel of image `i`; its label strip starts `H × scale`
    /// rows below.
    pub fn origin(&self, i: usize) -> (usize, usize) {
        let s = self.scale;
        let (cw, ch) = (self.geom.w * s, self.geom.h * s);
        let (col, row) = (i % self.cols, i / self.cols);
        (
            GAP * s + col * (cw + GAP * s),
            GAP * s + row * (ch + (STRIP + GAP) * s),
        )
    }
}

/// One byte per element of `bytes` (see the module docs for the rule), or
/// why `dtype` cannot be pixels.
pub fn pixels(dtype: DType, bytes: &[u8]) -> Result<Vec<u8>, String> {
    fn level(v: f32) -> u8 {
        // `as` saturates (and NaN becomes 0); clamp says so.
        (v * 255.0).round().clamp(0.0, 255.0) as u8
    }
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> u8) -> Vec<u8> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact")))
            .collect()
    }
    Ok(match dtype {
        DType::U8 => bytes.to_vec(),
        DType::F32 => each(bytes, |c| level(f32::from_le_bytes(c))),
        DType::F64 => each(bytes, |c| {
            (f64::from_le_bytes(c) * 255.0).round().clamp(0.0, 255.0) as u8
        }),
        DType::F16 => each(bytes, |c| level(half::f16::from_le_bytes(c).to_f32())),
        DType::BF16 => each(bytes, |c| level(half::bf16::from_le_bytes(c).to_f32())),
        other => {
            return Err(format!(
                "x is {other}: the viewer draws float pixels (0 to 1) or uint8 ones"
            ))
        }
    })
}

/// The labels of `n` examples of y (`elems` values each): a number per
/// example when y holds one integer (or bool) each, else `None` (drawn "?").
pub fn labels(dtype: DType, elems: usize, n: usize, bytes: &[u8]) -> Vec<Option<i64>> {
    let size = dtype.size();
    if elems != 1 || !(dtype.is_integer() || dtype == DType::Bool) || bytes.len() < n * size {
        return vec![None; n];
    }
    bytes
        .chunks_exact(size)
        .take(n)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            let signed = matches!(dtype, DType::I8 | DType::I16 | DType::I32 | DType::I64);
            let v = if signed && c[size - 1] & 0x80 != 0 {
                // Sign-extend.
                b[size..].fill(0xff);
                i64::from_le_bytes(b)
            } else {
                u64::from_le_bytes(b).min(i64::MAX as u64) as i64
            };
            Some(v)
        })
        .collect()
}

/// A label as drawn: its decimal digits, or "?".
pub fn label_text(l: Option<i64>) -> String {
    l.map_or_else(|| "?".into(), |v| v.to_string())
}

/// The 5×7 glyph of `c` (rows top to bottom, bit 4 leftmost); digits,
/// '-' and '?'.
pub fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        '-' => [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00],
        _ => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

/// The label strip of a cell `w` pixels wide at `scale = 1`, as levels
/// (`STRIP` rows of `w`): what [`render`] draws, scaled, under an image.
/// Text wider than the cell keeps its first `(w + 1) / 6` characters.
pub fn strip(text: &str, w: usize) -> Vec<u8> {
    let mut out = vec![STRIP_LEVEL; STRIP * w];
    let chars: Vec<char> = text.chars().take((w + 1) / 6).collect();
    let tw = (chars.len() * 6).saturating_sub(1);
    if tw > w {
        return out;
    }
    let left = (w - tw) / 2;
    for (k, &c) in chars.iter().enumerate() {
        for (r, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    out[(1 + r) * w + left + k * 6 + col] = INK;
                }
            }
        }
    }
    out
}

/// The grid's pixels as PNG rows (`channels` bytes a pixel): `px` holds
/// one level per element of the `n` examples, in x's order.
pub fn render(grid: &Grid, px: &[u8], labels: &[Option<i64>]) -> Vec<u8> {
    let g = grid.geom;
    let (c, s) = (g.channels(), grid.scale);
    let (width, height) = (
        grid.width().expect("checked in Grid::new"),
        grid.height().expect("checked in Grid::new"),
    );
    let hw = g.h * g.w;
    let mut out = vec![GAP_LEVEL; width * height * c];
    for i in 0..grid.n {
        let ex = &px[i * hw * c..(i + 1) * hw * c];
        let (x0, y0) = grid.origin(i);
        for y in 0..g.h * s {
            let row = (y0 + y) * width;
            for x in 0..g.w * s {
                let p = (y / s) * g.w + x / s;
                let o = (row + x0 + x) * c;
                match g.layout {
                    Layout::Gray => out[o] = ex[p],
                    Layout::Chw => {
                        for k in 0..3 {
                            out[o + k] = ex[k * hw + p];
                        }
                    }
                    Layout::Hwc => out[o..o + 3].copy_from_slice(&ex[p * 3..p * 3 + 3]),
                }
            }
        }
        let st = strip(&label_text(labels.get(i).copied().flatten()), g.w);
        for y in 0..STRIP * s {
            let row = (y0 + g.h * s + y) * width;
            for x in 0..g.w * s {
                let o = (row + x0 + x) * c;
                out[o..o + c].fill(st[(y / s) * g.w + x / s]);
            }
        }
    }
    out
}

/// `rows` (from [`render`]) as a PNG file.
pub fn encode(grid: &Grid, rows: &[u8]) -> Result<Vec<u8>, String> {
    let (w, h) = (
        grid.width().expect("checked in Grid::new"),
        grid.height().expect("checked in Grid::new"),
    );
    let mut out = Vec::new();
    let mut e = ::png::Encoder::new(&mut out, w as u32, h as u32);
    e.set_color(if grid.geom.channels() == 1 {
        ::png::ColorType::Grayscale
    } else {
        ::png::ColorType::Rgb
    });
    e.set_depth(::png::BitDepth::Eight);
    // Fast: a 1.2 Mpx grid in ~15 ms instead of ~60 (digits compress well
    // either way: mostly black).
    e.set_compression(::png::Compression::Fast);
    let mut wr = e.write_header().map_err(|e| format!("PNG: {e}"))?;
    wr.write_image_data(rows).map_err(|e| format!("PNG: {e}"))?;
    wr.finish().map_err(|e| format!("PNG: {e}"))?;
    Ok(out)
}

/// Tensor bytes and shape, as the daemon holds them or a client received them.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    /// Full shape: examples first.
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// The PNG of a minibatch: `x` and `y` hold exactly its examples.
pub fn minibatch(x: TensorRef<'_>, y: TensorRef<'_>, scale: u32) -> Result<Vec<u8>, String> {
    let n = x.shape.first().copied().unwrap_or(0);
    let geom = geometry(&x.shape[1.min(x.shape.len())..])?;
    let grid = Grid::new(n, geom, scale)?;
    let px = pixels(x.dtype, x.data)?;
    let need = n * geom.h * geom.w * geom.channels();
    if px.len() != need {
        return Err(format!(
            "x holds {} values, its shape {:?} says {need}",
            px.len(),
            x.shape
        ));
    }
    let elems = y.shape.get(1..).map_or(1, |d| d.iter().product());
    let labels = labels(y.dtype, elems, n, y.data);
    encode(&grid, &render(&grid, &px, &labels))
}

/// The PNG of a minibatch a client received, at the default scale: the
/// daemon's `/minibatch.png` of it when it came as stored.
pub fn of_batch(b: &crate::client::Batch) -> Result<Vec<u8>, String> {
    let shape = |s: &[u64]| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let (xs, ys) = (shape(&b.x.shape), shape(&b.y.shape));
    minibatch(
        TensorRef {
            dtype: b.x.dtype,
            shape: &xs,
            data: &b.x.data,
        },
        TensorRef {
            dtype: b.y.dtype,
            shape: &ys,
            data: &b.y.data,
        },
        DEFAULT_SCALE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_that_are_images_and_those_that_are_not() {
        let gray = |h, w| {
            Ok(Geometry {
                h,
                w,
                layout: Layout::Gray,
            })
        };
        assert_eq!(geometry(&[784]), gray(28, 28));
        assert_eq!(geometry(&[28, 28]), gray(28, 28));
        assert_eq!(geometry(&[1, 28, 28]), gray(28, 28));
        assert_eq!(geometry(&[28, 28, 1]), gray(28, 28));
        let chw = Geometry {
            h: 32,
            w: 32,
            layout: Layout::Chw,
        };
        assert_eq!(geometry(&[3072]), Ok(chw));
        assert_eq!(geometry(&[3, 32, 32]), Ok(chw));
        assert_eq!(geometry(&[32, 32, 3]).unwrap().layout, Layout::Hwc);
        for bad in [&[10][..], &[1], &[], &[2, 3, 4], &[4, 4, 4, 4], &[0, 5]] {
            let e = geometry(bad).unwrap_err();
            assert!(e.contains("not images"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn grids_are_bounded() {
        let g = geometry(&[784]).unwrap();
        let grid = Grid::new(64, g, 1).unwrap();
        assert_eq!((grid.cols, grid.rows), (8, 8));
        assert_eq!(grid.width(), Some(2 + 8 * 30));
        assert_eq!(grid.height(), Some(2 + 8 * (28 + 9 + 2)));
        assert_eq!(Grid::new(5, g, 1).unwrap().rows, 2);
        assert!(Grid::new(257, g, 1).unwrap_err().contains("exceed the 256"));
        assert!(Grid::new(1, g, 0).unwrap_err().contains("scale 0"));
        assert!(Grid::new(256, g, 4)
            .unwrap_err()
            .contains("over the 4194304"));
        let huge = Geometry {
            h: usize::MAX / 2,
            w: 3,
            layout: Layout::Gray,
        };
        assert!(Grid::new(1, huge, 8).unwrap_err().contains("pixels"));
    }

    #[test]
    fn pixels_and_labels() {
        let f: Vec<u8> = [0.0f32, 0.5, 1.0, 2.0, -1.0, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(pixels(DType::F32, &f).unwrap(), [0, 128, 255, 255, 0, 0]);
        assert_eq!(pixels(DType::U8, &[7, 9]).unwrap(), [7, 9]);
        assert!(pixels(DType::I64, &[0; 8]).unwrap_err().contains("int64"));
        let y: Vec<u8> = [3i64, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(labels(DType::I64, 1, 2, &y), [Some(3), Some(-2)]);
        assert_eq!(labels(DType::I8, 1, 1, &[0xfe]), [Some(-2)]);
        assert_eq!(labels(DType::U8, 1, 1, &[0xfe]), [Some(254)]);
        assert_eq!(labels(DType::F32, 1, 1, &[0; 4]), [None]);
        assert_eq!(labels(DType::I64, 10, 1, &[0; 80]), [None]);
    }

    #[test]
    fn a_png_decodes_to_its_cells_and_labels() {
        let x: Vec<u8> = (0..2 * 16).map(|v| v as u8 * 8).collect();
        let y: Vec<u8> = [7i64, 42].iter().flat_map(|v| v.to_le_bytes()).collect();
        let xr = TensorRef {
            dtype: DType::U8,
            shape: &[2, 4, 4],
            data: &x,
        };
        let yr = TensorRef {
            dtype: DType::I64,
            shape: &[2],
            data: &y,
        };
        let png = minibatch(xr, yr, 2).unwrap();
        let mut d = ::png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; d.output_buffer_size().unwrap()];
        let info = d.next_frame(&mut buf).unwrap();
        let grid = Grid::new(2, geometry(&[4, 4]).unwrap(), 2).unwrap();
        assert_eq!(info.width as usize, grid.width().unwrap());
        let w = info.width as usize;
        for i in 0..2 {
            let (x0, y0) = grid.origin(i);
            for r in 0..8 {
                for c in 0..8 {
                    assert_eq!(buf[(y0 + r) * w + x0 + c], x[i * 16 + (r / 2) * 4 + c / 2]);
                }
            }
        }
        // A glyph is 5 pixels wide: a 4-pixel cell has no room for one.
        assert!(!strip("7", 4).contains(&INK));
        assert!(strip("7", 5).contains(&INK));
        assert_eq!(
            strip("42", 28).iter().filter(|&&v| v == INK).count(),
            14 + 14
        );
        assert_eq!(
            strip("42", 5),
            strip("4", 5),
            "what does not fit is left out"
        );
    }
}
