//! A restricted pickle reader: it understands the opcodes of pickle protocols
//! 0–5 and exactly the globals needed to rebuild numpy arrays and plain
//! containers, and executes nothing.
//!
//! Why not `serde-pickle` (README "Loader"): through `BUILD` it loses numpy's
//! dtype, it mis-reads protocol 0's escaped strings, it clones memoized
//! payloads, and it accepts any global. Here every payload stays where the
//! decompressor wrote it: values are [`Span`]s into that buffer, memo
//! references copy a 24-byte [`Value`], and the few conversions pickle needs
//! (protocol 0 string escapes, `_codecs.encode(str, 'latin1')`) shrink the
//! bytes and are done in place.
//!
//! Objects (containers, arrays, dtypes) live in a flat arena and are named by
//! index, so cycles and shared references cost nothing and dropping a deeply
//! nested structure cannot overflow the stack.
//!
//! Costs are bounded as well as memory: REDUCE and BUILD read the argument
//! or state tuple where it lies (a memoized tuple used a million times is
//! never copied), shapes beyond numpy's [`MAX_DIMS`] and names beyond
//! [`MAX_NAME`] are refused before they are walked, and every step is
//! counted against the load's [`Work`] budget.
use std::collections::HashMap;

use crate::load::error::At;
use crate::load::work::Work;

/// Most marks open at once. Real datasets nest a handful deep.
pub const MAX_MARK_DEPTH: usize = 256;
/// Most values on the unpickler stack (pickle writes APPENDS in batches of
/// 1,000, so real files stay far below).
pub const MAX_STACK: usize = 1 << 20;
/// Most memo entries.
pub const MAX_MEMO: usize = 1 << 20;
/// Most values held in containers and objects together. A value is 24 bytes,
/// so this caps the reader's own memory near 100 MiB whatever the input says,
/// while a list of every MNIST image and label (140,000 values) fits easily.
pub const MAX_SLOTS: usize = 1 << 22;

/// Most dimensions an array may have: numpy's own limit (`NPY_MAXDIMS`, 64
/// since numpy 2.0, 32 before), so every array numpy can unpickle is read,
/// while a shape numpy itself refuses (a tuple of a million 1s costs two
/// bytes per dimension and compresses to nothing) is refused at its opcode,
/// before anything walks it.
pub const MAX_DIMS: usize = 64;
/// Longest text read as a name (module, attribute, type code, encoding, byte
/// order). numpy's longest type codes and module names are a few dozen bytes;
/// a longer one is refused instead of copied.
pub const MAX_NAME: usize = 256;

/// A byte range of the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// How a text value's bytes are encoded in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEnc {
    /// BINUNICODE and friends.
    Utf8,
    /// Protocol 0 UNICODE: latin-1 bytes with `\uXXXX` / `\UXXXXXXXX` escapes.
    RawUnicodeEscape,
}

/// Callables the reader knows. Anything else is refused at its opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// numpy.core.multiarray._reconstruct (numpy 1.x) / numpy._core.multiarray (2.x)
    Reconstruct,
    /// numpy.ndarray
    NdArray,
    /// numpy.dtype
    DType,
    /// numpy.core.numeric._frombuffer (protocol 5)
    FromBuffer,
    /// numpy.core.multiarray.scalar (numpy scalars such as np.int64(3))
    Scalar,
    /// _codecs.encode (bytes at protocols 0–2 under Python 3)
    CodecsEncode,
    /// builtins set / frozenset
    Set,
    /// builtins bytearray
    ByteArray,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
                Global::Reconstruct
            }
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::Scalar,
            ("numpy.core.numeric" | "numpy._core.numeric", "_frombuffer") => Global::FromBuffer,
            ("numpy", "ndarray") => Global::NdArray,
            ("numpy", "dtype") => Global::DType,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("__builtin__" | "builtins", "set" | "frozenset") => Global::Set,
            ("__builtin__" | "builtins", "bytearray") => Global::ByteArray,
            _ => return None,
        })
    }
}

/// Index of an object in [`Parsed::objects`].
pub type ObjId = u32;

/// A pickled value. Small and `Copy`: memo references share, never copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Python 2 `str` / Python 3 `bytes` or `bytearray`.
    Bytes(Span),
    /// Python 3 `str` (Python 2 `unicode`).
    Str(Span, TextEnc),
    Global(Global),
    Obj(ObjId),
}

/// A numpy dtype as pickled: type code and byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DTypeObj {
    /// numpy's code without byte order, e.g. "f4".
    pub code: String,
    /// b'<', b'>', b'|' or b'=' (the default until BUILD sets it).
    pub byteorder: u8,
}

/// A numpy array once rebuilt (after `_reconstruct` + BUILD, or `_frombuffer`).
#[derive(Debug, Clone)]
pub struct ArrayObj {
    pub dtype: Option<DTypeObj>,
    pub shape: Vec<usize>,
    pub fortran: bool,
    /// Raw payload, None until BUILD gives it.
    pub data: Option<Span>,
}

#[derive(Debug, Clone)]
pub enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Array(ArrayObj),
    DType(DTypeObj),
    /// A numpy scalar: dtype and its raw bytes.
    Scalar(DTypeObj, Span),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Tuple(_) => "tuple",
            Object::List(_) => "list",
            Object::Dict(_) => "dict",
            Object::Set(_) => "set",
            Object::Array(_) => "numpy array",
            Object::DType(_) => "numpy dtype",
            Object::Scalar(..) => "numpy scalar",
        }
    }
}

/// The result of reading one pickle.
#[derive(Debug)]
pub struct Parsed {
    pub root: Value,
    /// Every object with the offset of the opcode that made it.
    pub objects: Vec<(Object, usize)>,
    /// Protocol declared by PROTO (0 when absent).
    pub protocol: u8,
}

impl Parsed {
    pub fn obj(&self, id: ObjId) -> &Object {
        &self.objects[id as usize].0
    }
    pub fn offset(&self, id: ObjId) -> usize {
        self.objects[id as usize].1
    }
}

/// Describes a value for error messages.
pub fn describe(p: &Parsed, v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Int(i) => format!("int {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Bytes(s) => format!("bytes of length {}", s.len()),
        Value::Str(..) => "str".into(),
        Value::Global(g) => format!("global {g:?}"),
        Value::Obj(id) => match p.obj(*id) {
            Object::Tuple(v) => format!("tuple of {}", v.len()),
            Object::List(v) => format!("list of {}", v.len()),
            o => o.kind().into(),
        },
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Reads one pickle from `buf`, which it may rewrite in place (escapes are
/// decoded where they stand). Bytes after STOP are an error: a dataset file
/// holds one pickle. Every step is counted against `work`; once that budget
/// is spent the read stops with an error at the opcode it had reached.
pub fn parse(buf: &mut [u8], work: &mut Work) -> Result<Parsed, At> {
    let mut r = Reader {
        buf,
        work,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        slots: 0,
        encoded: HashMap::new(),
        protocol: 0,
    };
    let root = r.run()?;
    if r.pos != r.buf.len() {
        return Err(At::new(
            r.pos,
            format!(
                "{} bytes after the pickle's STOP opcode: expected end of data",
                r.buf.len() - r.pos
            ),
        ));
    }
    Ok(Parsed {
        root,
        objects: r.objects,
        protocol: r.protocol,
    })
}

struct Reader<'a> {
    buf: &'a mut [u8],
    work: &'a mut Work,
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objects: Vec<(Object, usize)>,
    slots: usize,
    /// `_codecs.encode` results by source span start: the conversion is in
    /// place, so a second call on the same memoized str must reuse it.
    encoded: HashMap<usize, Span>,
    protocol: u8,
}

/// The length and first `N` items of a tuple, copied out. Values are `Copy`,
/// so this costs the same however long the tuple is: a memoized tuple that
/// many REDUCEs or BUILDs name is never copied whole (every callable and
/// every state the reader knows reads at most its first five items).
struct Head<const N: usize> {
    len: usize,
    items: [Value; N],
}

impl<const N: usize> Head<N> {
    /// Item `i`, if the tuple has it.
    fn get(&self, i: usize) -> Option<Value> {
        (i < self.len.min(N)).then(|| self.items[i])
    }

    /// Item `i`, or None (Python's) if the tuple is shorter.
    fn arg(&self, i: usize) -> Value {
        self.get(i).unwrap_or(Value::None)
    }
}

impl Reader<'_> {
    fn err(&self, what: impl Into<String>) -> At {
        At::new(self.op_at, what)
    }

    /// Counts `n` steps of work at the current opcode.
    fn step(&mut self, n: usize) -> Result<(), At> {
        self.work.charge(n, self.op_at)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Span, At> {
        let avail = self.buf.len() - self.pos;
        if n > avail {
            return Err(At::new(
                self.pos,
                format!(
                    "{} declares {n} bytes of {what}, but only {avail} remain (truncated or corrupt)",
                    op_name(self.buf[self.op_at])
                ),
            ));
        }
        let s = Span {
            start: self.pos,
            end: self.pos + n,
        };
        self.pos += n;
        Ok(s)
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], At> {
        let s = self.take(N, what)?;
        Ok(self.buf[s.start..s.end].try_into().unwrap())
    }

    fn len_u64(&mut self, n: u64, what: &str) -> Result<Span, At> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.take(n, what)
    }

    /// A newline-terminated text argument (protocol 0), without the newline.
    fn line(&mut self) -> Result<Span, At> {
        match self.buf[self.pos..].iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.step(n)?;
                let s = Span {
                    start: self.pos,
                    end: self.pos + n,
                };
                self.pos += n + 1;
                Ok(s)
            }
            None => Err(At::new(
                self.pos,
                format!(
                    "{} expects a newline-terminated argument; the data ends first",
                    op_name(self.buf[self.op_at])
                ),
            )),
        }
    }

    fn line_str(&mut self) -> Result<String, At> {
        let s = self.line()?;
        let t = &self.buf[s.start..s.end];
        let t = t.strip_suffix(b"\r").unwrap_or(t);
        std::str::from_utf8(t)
            .map(str::to_owned)
            .map_err(|_| At::new(s.start, "expected ASCII text"))
    }

    fn push(&mut self, v: Value) -> Result<(), At> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack exceeds {MAX_STACK} values")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, At> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!(
                "{} needs a value, but the stack is empty",
                op_name(self.buf[self.op_at])
            )));
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&self) -> Result<Value, At> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!(
                "{} needs a value, but the stack is empty",
                op_name(self.buf[self.op_at])
            )));
        }
        Ok(*self.stack.last().unwrap())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, At> {
        let m = self.marks.pop().ok_or_else(|| {
            self.err(format!(
                "{} needs a MARK, but none is open",
                op_name(self.buf[self.op_at])
            ))
        })?;
        self.step(self.stack.len() - m)?;
        Ok(self.stack.split_off(m))
    }

    /// Counts `n` values stored in containers and objects, against both the
    /// memory limit and the work budget.
    fn charge(&mut self, n: usize) -> Result<(), At> {
        self.step(n)?;
        self.slots += n;
        if self.slots > MAX_SLOTS {
            return Err(self.err(format!(
                "more than {MAX_SLOTS} Python values: not a dataset of arrays (store images as numpy arrays)"
            )));
        }
        Ok(())
    }

    fn new_obj(&mut self, o: Object) -> Result<Value, At> {
        let n = match &o {
            Object::Tuple(v) | Object::List(v) | Object::Set(v) => v.len(),
            Object::Dict(v) => 2 * v.len(),
            _ => 1,
        };
        self.charge(n + 1)?;
        let id = ObjId::try_from(self.objects.len()).map_err(|_| self.err("too many objects"))?;
        self.objects.push((o, self.op_at));
        Ok(Value::Obj(id))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), At> {
        let v = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(self.err(format!("memo exceeds {MAX_MEMO} entries")));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), At> {
        let v = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(format!("memo key {key} was never stored (corrupt pickle)")))?;
        self.push(v)
    }

    /// A short text value (type code, module or attribute name, encoding,
    /// byte order) as a String; None if `v` is not text. Text longer than
    /// [`MAX_NAME`] is refused rather than copied: a memoized megabyte str
    /// named by many REDUCEs would otherwise be copied by each.
    fn text(&mut self, v: Value) -> Result<Option<String>, At> {
        let (Value::Bytes(s) | Value::Str(s, _)) = v else {
            return Ok(None);
        };
        if s.len() > MAX_NAME {
            return Err(self.err(format!(
                "{}: text of {} bytes where a type code or name is expected (at most {MAX_NAME})",
                op_name(self.buf[self.op_at]),
                s.len()
            )));
        }
        self.step(s.len())?;
        let b = &self.buf[s.start..s.end];
        Ok(match v {
            Value::Str(_, TextEnc::Utf8) => std::str::from_utf8(b).ok().map(str::to_owned),
            Value::Str(_, TextEnc::RawUnicodeEscape) => {
                let mut out = b.to_vec();
                decode_raw_unicode_escape(&mut out, false)
                    .ok()
                    .and_then(|n| std::str::from_utf8(&out[..n]).ok().map(str::to_owned))
            }
            _ => Some(b.iter().map(|&c| c as char).collect()),
        })
    }

    /// The items of a tuple, borrowed from the arena (never copied).
    fn tuple_ref(&self, v: Value, what: &str) -> Result<&[Value], At> {
        match v {
            Value::Obj(id) => match &self.objects[id as usize].0 {
                Object::Tuple(items) => Ok(items),
                o => Err(self.err(format!("{what}: expected a tuple, found a {}", o.kind()))),
            },
            other => Err(self.err(format!("{what}: expected a tuple, found {other:?}"))),
        }
    }

    fn tuple_head<const N: usize>(&self, v: Value, what: &str) -> Result<Head<N>, At> {
        let items = self.tuple_ref(v, what)?;
        let mut head = Head {
            len: items.len(),
            items: [Value::None; N],
        };
        let k = items.len().min(N);
        head.items[..k].copy_from_slice(&items[..k]);
        Ok(head)
    }

    fn int(&self, v: Value, what: &str) -> Result<i64, At> {
        match v {
            Value::Int(i) => Ok(i),
            Value::Bool(b) => Ok(b as i64),
            other => Err(self.err(format!("{what}: expected an int, found {other:?}"))),
        }
    }

    /// An array shape: a tuple of at most [`MAX_DIMS`] non-negative ints. The
    /// count is checked before any dimension is read.
    fn shape(&mut self, v: Value) -> Result<Vec<usize>, At> {
        let nd = self.tuple_ref(v, "array shape")?.len();
        if nd > MAX_DIMS {
            return Err(self.err(format!(
                "array shape has {nd} dimensions, more than numpy's limit of {MAX_DIMS}"
            )));
        }
        self.step(nd)?;
        self.tuple_ref(v, "array shape")?
            .iter()
            .map(|&d| {
                let d = self.int(d, "array shape")?;
                usize::try_from(d).map_err(|_| self.err(format!("negative dimension {d} in shape")))
            })
            .collect()
    }

    fn dtype_of(&self, v: Value) -> Result<DTypeObj, At> {
        match v {
            Value::Obj(id) => match &self.objects[id as usize].0 {
                Object::DType(d) => Ok(d.clone()),
                o => Err(self.err(format!("expected a numpy dtype, found a {}", o.kind()))),
            },
            other => Err(self.err(format!("expected a numpy dtype, found {other:?}"))),
        }
    }

    /// `_codecs.encode(s, 'latin1')`: the str's code points become bytes,
    /// written over the str's own bytes (never longer than the encoding).
    fn encode_latin1(&mut self, v: Value) -> Result<Value, At> {
        let (span, enc) = match v {
            Value::Str(s, e) => (s, e),
            Value::Bytes(s) => return Ok(Value::Bytes(s)),
            other => return Err(self.err(format!("_codecs.encode expects a str, found {other:?}"))),
        };
        if let Some(done) = self.encoded.get(&span.start) {
            return Ok(Value::Bytes(*done));
        }
        self.step(span.len())?;
        let region = &mut self.buf[span.start..span.end];
        let n = match enc {
            TextEnc::Utf8 => utf8_to_latin1_in_place(region),
            TextEnc::RawUnicodeEscape => decode_raw_unicode_escape(region, true),
        }
        .map_err(|(at, what)| At::new(span.start + at, what))?;
        let out = Span {
            start: span.start,
            end: span.start + n,
        };
        self.encoded.insert(span.start, out);
        Ok(Value::Bytes(out))
    }

    /// Bytes from a bytes value, or from a str through latin1 (what Python 3
    /// writes for Python 2 `str` payloads).
    fn payload(&mut self, v: Value) -> Option<Result<Span, At>> {
        match v {
            Value::Bytes(s) => Some(Ok(s)),
            Value::Str(..) => Some(self.encode_latin1(v).map(|b| match b {
                Value::Bytes(s) => s,
                _ => unreachable!("encode_latin1 returns bytes"),
            })),
            _ => None,
        }
    }

    // --- REDUCE: the allowlisted callables ---------------------------------

    fn call(&mut self, f: Global, args: Value) -> Result<Value, At> {
        // No callable the reader knows takes more than 4 arguments.
        let a = self.tuple_head::<4>(args, "REDUCE arguments")?;
        match f {
            Global::Reconstruct => self.call_reconstruct(&a),
            Global::DType => self.call_dtype(&a),
            Global::FromBuffer => self.call_frombuffer(&a),
            Global::Scalar => self.call_scalar(&a),
            Global::CodecsEncode => self.call_codecs_encode(&a),
            Global::Set => self.call_set(&a),
            Global::ByteArray => self.call_bytearray(&a),
            Global::NdArray => Err(self.err("calling numpy.ndarray directly is not supported")),
        }
    }

    /// `_reconstruct(ndarray, (0,), b'b')`: an empty array that BUILD fills.
    fn call_reconstruct(&mut self, a: &Head<4>) -> Result<Value, At> {
        if a.get(0) != Some(Value::Global(Global::NdArray)) {
            return Err(self.err(
                "_reconstruct of something other than numpy.ndarray (subclasses are not supported)",
            ));
        }
        self.new_obj(Object::Array(ArrayObj {
            dtype: None,
            shape: Vec::new(),
            fortran: false,
            data: None,
        }))
    }

    /// `numpy.dtype(code, align, copy)`.
    fn call_dtype(&mut self, a: &Head<4>) -> Result<Value, At> {
        let code = self
            .text(a.arg(0))?
            .ok_or_else(|| self.err("numpy.dtype expects a type code string"))?;
        let (byteorder, code) = match code.as_bytes().first() {
            Some(&b @ (b'<' | b'>' | b'|' | b'=')) => (b, code[1..].to_string()),
            _ => (b'=', code),
        };
        self.new_obj(Object::DType(DTypeObj { code, byteorder }))
    }

    /// `_frombuffer(buffer, dtype, shape, order)` (protocol 5).
    fn call_frombuffer(&mut self, a: &Head<4>) -> Result<Value, At> {
        if a.len != 4 {
            return Err(self.err(format!(
                "_frombuffer expects (buffer, dtype, shape, order), got {} arguments",
                a.len
            )));
        }
        let data = match a.arg(0) {
            Value::Bytes(s) => s,
            other => {
                return Err(self.err(format!(
                    "_frombuffer expects an in-band buffer, found {other:?}"
                )))
            }
        };
        let dtype = self.dtype_of(a.arg(1))?;
        let shape = self.shape(a.arg(2))?;
        let order = self.text(a.arg(3))?.unwrap_or_default();
        let fortran = match order.as_str() {
            "C" => false,
            "F" => true,
            o => return Err(self.err(format!("_frombuffer order must be 'C' or 'F', found {o:?}"))),
        };
        self.new_obj(Object::Array(ArrayObj {
            dtype: Some(dtype),
            shape,
            fortran,
            data: Some(data),
        }))
    }

    /// `numpy.core.multiarray.scalar(dtype, bytes)`.
    fn call_scalar(&mut self, a: &Head<4>) -> Result<Value, At> {
        let dtype = self.dtype_of(a.arg(0))?;
        let data = match a.get(1).and_then(|v| self.payload(v)) {
            Some(s) => s?,
            None => return Err(self.err("numpy scalar expects (dtype, bytes)")),
        };
        self.new_obj(Object::Scalar(dtype, data))
    }

    /// `_codecs.encode(str, 'latin1')`.
    fn call_codecs_encode(&mut self, a: &Head<4>) -> Result<Value, At> {
        let enc = match a.get(1) {
            Some(v) => self.text(v)?.unwrap_or_default(),
            None => String::new(),
        };
        if !matches!(
            enc.to_ascii_lowercase().as_str(),
            "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1"
        ) {
            return Err(self.err(format!(
                "_codecs.encode with encoding {enc:?}: only latin1 is understood"
            )));
        }
        self.encode_latin1(a.arg(0))
    }

    /// `set(list)` / `frozenset(list)`: the one callable that copies a
    /// container; `new_obj` charges every item of the copy.
    fn call_set(&mut self, a: &Head<4>) -> Result<Value, At> {
        let items = match a.get(0) {
            None => Vec::new(),
            Some(Value::Obj(id)) => match &self.objects[id as usize].0 {
                Object::List(v) | Object::Tuple(v) | Object::Set(v) => v.clone(),
                o => return Err(self.err(format!("set() of a {}", o.kind()))),
            },
            Some(v) => return Err(self.err(format!("set() of {v:?}"))),
        };
        self.new_obj(Object::Set(items))
    }

    /// `bytearray()` / `bytearray(bytes)` / `bytearray(str, 'latin-1')`.
    fn call_bytearray(&mut self, a: &Head<4>) -> Result<Value, At> {
        match a.get(0) {
            None => Ok(Value::Bytes(Span {
                start: self.op_at,
                end: self.op_at,
            })),
            Some(Value::Bytes(s)) => Ok(Value::Bytes(s)),
            Some(v @ Value::Str(..)) => self.encode_latin1(v),
            Some(v) => Err(self.err(format!("bytearray() of {v:?}"))),
        }
    }

    // --- BUILD: state of numpy dtypes and arrays ----------------------------

    fn build(&mut self, target: Value, state: Value) -> Result<(), At> {
        let id = match target {
            Value::Obj(id) => id as usize,
            other => {
                return Err(self.err(format!(
                    "BUILD on {other:?}: only numpy arrays and dtypes take state"
                )))
            }
        };
        // Both states are read from their first five items (or fewer).
        let st = self.tuple_head::<5>(state, "BUILD state")?;
        match &self.objects[id].0 {
            Object::DType(_) => self.build_dtype(id, &st),
            Object::Array(_) => self.build_array(id, &st),
            o => Err(self.err(format!(
                "BUILD on a {}: only numpy arrays and dtypes take state",
                o.kind()
            ))),
        }
    }

    /// numpy dtype state: (version, byteorder, subarray, names, fields,
    /// elsize, alignment, flags[, metadata]); only the byte order matters.
    fn build_dtype(&mut self, id: usize, st: &Head<5>) -> Result<(), At> {
        if st.len < 5 {
            return Err(self.err(format!(
                "numpy dtype state has {} items, expected 8 or 9",
                st.len
            )));
        }
        let order = self
            .text(st.arg(1))?
            .ok_or_else(|| self.err("numpy dtype state: byte order is not a string"))?;
        if st.arg(2) != Value::None || st.arg(3) != Value::None || st.arg(4) != Value::None {
            return Err(self.err("structured or sub-array numpy dtypes are not supported"));
        }
        let b = match order.as_bytes() {
            [b @ (b'<' | b'>' | b'|' | b'=')] => *b,
            _ => return Err(self.err(format!("numpy dtype byte order {order:?}"))),
        };
        if let Object::DType(d) = &mut self.objects[id].0 {
            d.byteorder = b;
        }
        Ok(())
    }

    /// numpy array state: (version, shape, dtype, is_fortran, data) or, from
    /// old numpy, the same without the version.
    fn build_array(&mut self, id: usize, st: &Head<5>) -> Result<(), At> {
        let first = match st.len {
            5 => 1,
            4 => 0,
            n => return Err(self.err(format!("numpy array state has {n} items, expected 5"))),
        };
        let shape = self.shape(st.arg(first))?;
        let dtype = self.dtype_of(st.arg(first + 1))?;
        let fortran = match st.arg(first + 2) {
            Value::Bool(b) => b,
            Value::Int(i) => i != 0,
            other => return Err(self.err(format!("numpy array state: is_fortran is {other:?}"))),
        };
        let data = match st.arg(first + 3) {
            v @ (Value::Bytes(_) | Value::Str(..)) => self.payload(v).unwrap()?,
            Value::Obj(_) => {
                return Err(self.err(format!(
                "numpy array of dtype {:?} holds Python objects (dtype=object is not supported)",
                dtype.code
            )))
            }
            other => return Err(self.err(format!("numpy array state: data is {other:?}"))),
        };
        if let Object::Array(a) = &mut self.objects[id].0 {
            *a = ArrayObj {
                dtype: Some(dtype),
                shape,
                fortran,
                data: Some(data),
            };
        }
        Ok(())
    }

    fn container_mut(&mut self, v: Value) -> Result<&mut Object, At> {
        match v {
            Value::Obj(id) => Ok(&mut self.objects[id as usize].0),
            other => Err(self.err(format!("expected a container, found {other:?}"))),
        }
    }

    fn extend(&mut self, target: Value, items: Vec<Value>) -> Result<(), At> {
        self.charge(items.len())?;
        let at = self.op_at;
        match self.container_mut(target)? {
            Object::List(v) | Object::Set(v) => {
                v.extend(items);
                Ok(())
            }
            o => {
                let k = o.kind();
                Err(At::new(at, format!("cannot append to a {k}")))
            }
        }
    }

    fn set_items(&mut self, target: Value, items: Vec<Value>) -> Result<(), At> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        self.charge(items.len())?;
        let at = self.op_at;
        match self.container_mut(target)? {
            Object::Dict(d) => {
                d.extend(items.chunks(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            o => {
                let k = o.kind();
                Err(At::new(at, format!("cannot set items of a {k}")))
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<Value, At> {
        Global::resolve(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                self.err(format!(
                    "refusing global {module}.{name}: only numpy arrays, dtypes and plain containers are allowed (nothing in a dataset file is executed)"
                ))
            })
    }

    // --- the opcode loop -----------------------------------------------------

    /// Executes opcodes until STOP. One arm per opcode family; each family's
    /// argument decoding lives in its `op_*` method.
    fn run(&mut self) -> Result<Value, At> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.buf.get(self.pos) else {
                return Err(At::new(
                    self.pos,
                    "the pickle ends without a STOP opcode (truncated)",
                ));
            };
            self.pos += 1;
            self.step(1)?;
            match op {
                0x80 => self.op_proto()?,
                0x95 => self.op_frame()?,
                b'.' => return self.op_stop(),
                b'(' => self.op_mark()?,
                b'0' => self.op_pop()?,
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'I' | b'L' | b'J' | b'K' | b'M' | 0x8a | 0x8b => self.op_int(op)?,
                b'F' | b'G' => self.op_float(op)?,
                b'S' | b'T' | b'U' | b'C' | b'B' | 0x8e | 0x96 => self.op_bytes(op)?,
                0x98 => self.op_readonly_buffer()?,
                b'V' | b'X' | 0x8c | 0x8d => self.op_text(op)?,
                b')' | 0x85..=0x87 | b't' | b']' | b'l' | b'}' | b'd' | 0x8f | 0x91 => {
                    self.op_new_container(op)?
                }
                b'a' | b'e' | 0x90 | b's' | b'u' => self.op_add_items(op)?,
                b'p' | b'q' | b'r' | 0x94 => self.op_memo_put(op)?,
                b'g' | b'h' | b'j' => self.op_memo_get(op)?,
                b'c' | 0x93 => self.op_global(op)?,
                b'R' => self.op_reduce()?,
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                b'i' | b'o' | 0x81 | 0x92 | 0x82..=0x84 | b'P' | b'Q' | 0x97 => {
                    return Err(self.err(format!(
                        "opcode {:#04x} ({}) is not allowed: it builds arbitrary objects or needs out-of-band data",
                        op,
                        op_name(op)
                    )));
                }
                _ => {
                    return Err(self.err(format!(
                        "unknown opcode {op:#04x}: not a pickle, or a corrupt one"
                    )))
                }
            }
        }
    }

    /// PROTO
    fn op_proto(&mut self) -> Result<(), At> {
        let [v] = self.fixed::<1>("protocol version")?;
        if v > 5 {
            return Err(self.err(format!("pickle protocol {v} is newer than 5")));
        }
        self.protocol = v;
        Ok(())
    }

    /// FRAME: only checked; frames need no buffering when the whole pickle
    /// is in memory.
    fn op_frame(&mut self) -> Result<(), At> {
        let n = u64::from_le_bytes(self.fixed::<8>("frame length")?);
        let avail = (self.buf.len() - self.pos) as u64;
        if n > avail {
            return Err(self.err(format!(
                "FRAME declares {n} bytes, but only {avail} remain (truncated)"
            )));
        }
        Ok(())
    }

    /// STOP: the value on top is the pickle's.
    fn op_stop(&mut self) -> Result<Value, At> {
        let v = self.pop()?;
        if !self.marks.is_empty() {
            return Err(self.err("STOP with a MARK still open"));
        }
        Ok(v)
    }

    /// MARK
    fn op_mark(&mut self) -> Result<(), At> {
        if self.marks.len() >= MAX_MARK_DEPTH {
            return Err(self.err(format!("more than {MAX_MARK_DEPTH} nested MARKs")));
        }
        self.marks.push(self.stack.len());
        Ok(())
    }

    /// POP discards the top item, or the topmost mark if the stack is empty
    /// above it.
    fn op_pop(&mut self) -> Result<(), At> {
        let floor = self.marks.last().copied();
        if floor == Some(self.stack.len()) {
            self.marks.pop();
        } else {
            self.pop()?;
        }
        Ok(())
    }

    /// INT, LONG (protocol 0 text), BININT, BININT1, BININT2, LONG1, LONG4.
    fn op_int(&mut self, op: u8) -> Result<(), At> {
        let v = match op {
            b'I' => {
                let t = self.line_str()?;
                match t.as_str() {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => Value::Int(t.parse().map_err(|_| {
                        self.err(format!("INT argument {t:?} is not a 64-bit integer"))
                    })?),
                }
            }
            b'L' => {
                let t = self.line_str()?;
                let t2 = t.strip_suffix('L').unwrap_or(&t);
                Value::Int(t2.parse().map_err(|_| {
                    self.err(format!("LONG argument {t:?} is not a 64-bit integer"))
                })?)
            }
            b'J' => Value::Int(i32::from_le_bytes(self.fixed::<4>("int")?) as i64),
            b'K' => Value::Int(self.fixed::<1>("int")?[0] as i64),
            b'M' => Value::Int(u16::from_le_bytes(self.fixed::<2>("int")?) as i64),
            _ => Value::Int(self.long_binary(op)?),
        };
        self.push(v)
    }

    /// LONG1 / LONG4: little-endian two's complement of a declared length.
    fn long_binary(&mut self, op: u8) -> Result<i64, At> {
        let n = if op == 0x8a {
            self.fixed::<1>("length")?[0] as u64
        } else {
            let n = i32::from_le_bytes(self.fixed::<4>("length")?);
            u64::try_from(n).map_err(|_| self.err("LONG4 with a negative length"))?
        };
        let s = self.len_u64(n, "integer")?;
        if s.len() > 8 {
            return Err(self.err(format!("integer of {} bytes does not fit 64 bits", s.len())));
        }
        let b = &self.buf[s.start..s.end];
        let mut full = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            [0xffu8; 8]
        } else {
            [0u8; 8]
        };
        full[..b.len()].copy_from_slice(b);
        Ok(i64::from_le_bytes(full))
    }

    /// FLOAT (protocol 0 text), BINFLOAT.
    fn op_float(&mut self, op: u8) -> Result<(), At> {
        let v = if op == b'F' {
            let t = self.line_str()?;
            t.trim()
                .parse::<f64>()
                .map_err(|_| self.err(format!("FLOAT argument {t:?} is not a number")))?
        } else {
            f64::from_be_bytes(self.fixed::<8>("float")?)
        };
        self.push(Value::Float(v))
    }

    /// STRING (protocol 0, escapes decoded in place), BINSTRING,
    /// SHORT_BINSTRING, SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8.
    fn op_bytes(&mut self, op: u8) -> Result<(), At> {
        let s = match op {
            b'S' => {
                let s = self.line()?;
                let n = unescape_string_in_place(&mut self.buf[s.start..s.end])
                    .map_err(|(at, what)| At::new(s.start + at, what))?;
                Span {
                    start: s.start,
                    end: s.start + n,
                }
            }
            b'T' => {
                let n = i32::from_le_bytes(self.fixed::<4>("length")?);
                let n =
                    u64::try_from(n).map_err(|_| self.err("BINSTRING with a negative length"))?;
                self.len_u64(n, "string")?
            }
            b'U' | b'C' => {
                let [n] = self.fixed::<1>("length")?;
                self.take(n as usize, "bytes")?
            }
            b'B' => {
                let n = u32::from_le_bytes(self.fixed::<4>("length")?);
                self.len_u64(n as u64, "bytes")?
            }
            _ => {
                let n = u64::from_le_bytes(self.fixed::<8>("length")?);
                self.len_u64(n, "bytes")?
            }
        };
        self.push(Value::Bytes(s))
    }

    /// READONLY_BUFFER: only marks the top buffer read-only.
    fn op_readonly_buffer(&mut self) -> Result<(), At> {
        match self.top()? {
            Value::Bytes(_) => Ok(()),
            other => Err(self.err(format!("READONLY_BUFFER on {other:?}"))),
        }
    }

    /// UNICODE (protocol 0, raw-unicode-escape), BINUNICODE,
    /// SHORT_BINUNICODE, BINUNICODE8.
    fn op_text(&mut self, op: u8) -> Result<(), At> {
        let v = match op {
            b'V' => Value::Str(self.line()?, TextEnc::RawUnicodeEscape),
            b'X' => {
                let n = u32::from_le_bytes(self.fixed::<4>("length")?);
                Value::Str(self.len_u64(n as u64, "text")?, TextEnc::Utf8)
            }
            0x8c => {
                let [n] = self.fixed::<1>("length")?;
                Value::Str(self.take(n as usize, "text")?, TextEnc::Utf8)
            }
            _ => {
                let n = u64::from_le_bytes(self.fixed::<8>("length")?);
                Value::Str(self.len_u64(n, "text")?, TextEnc::Utf8)
            }
        };
        self.push(v)
    }

    /// EMPTY_TUPLE, TUPLE1-3, TUPLE, EMPTY_LIST, LIST, EMPTY_DICT, DICT,
    /// EMPTY_SET, FROZENSET.
    fn op_new_container(&mut self, op: u8) -> Result<(), At> {
        let obj = match op {
            b')' => Object::Tuple(Vec::new()),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let floor = self.marks.last().copied().unwrap_or(0);
                if self.stack.len() < floor + n {
                    return Err(self.err(format!("{} needs {n} values on the stack", op_name(op))));
                }
                Object::Tuple(self.stack.split_off(self.stack.len() - n))
            }
            b't' => Object::Tuple(self.pop_mark()?),
            b']' => Object::List(Vec::new()),
            b'l' => Object::List(self.pop_mark()?),
            b'}' => Object::Dict(Vec::new()),
            b'd' => {
                let items = self.pop_mark()?;
                let v = self.new_obj(Object::Dict(Vec::new()))?;
                self.set_items(v, items)?;
                return self.push(v);
            }
            0x8f => Object::Set(Vec::new()),
            _ => Object::Set(self.pop_mark()?),
        };
        let v = self.new_obj(obj)?;
        self.push(v)
    }

    /// APPEND, APPENDS, ADDITEMS, SETITEM, SETITEMS.
    fn op_add_items(&mut self, op: u8) -> Result<(), At> {
        match op {
            b'a' => {
                let item = self.pop()?;
                let list = self.top()?;
                self.extend(list, vec![item])
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                let list = self.top()?;
                self.extend(list, items)
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                self.set_items(d, vec![k, v])
            }
            _ => {
                let items = self.pop_mark()?;
                let d = self.top()?;
                self.set_items(d, items)
            }
        }
    }

    /// PUT, BINPUT, LONG_BINPUT, MEMOIZE.
    fn op_memo_put(&mut self, op: u8) -> Result<(), At> {
        let k = match op {
            b'p' => {
                let t = self.line_str()?;
                t.parse().map_err(|_| self.err(format!("PUT key {t:?}")))?
            }
            b'q' => self.fixed::<1>("memo key")?[0] as u64,
            b'r' => u32::from_le_bytes(self.fixed::<4>("memo key")?) as u64,
            _ => self.memo.len() as u64,
        };
        self.memo_put(k)
    }

    /// GET, BINGET, LONG_BINGET: the stored value is shared, not copied.
    fn op_memo_get(&mut self, op: u8) -> Result<(), At> {
        let k = match op {
            b'g' => {
                let t = self.line_str()?;
                t.parse().map_err(|_| self.err(format!("GET key {t:?}")))?
            }
            b'h' => self.fixed::<1>("memo key")?[0] as u64,
            _ => u32::from_le_bytes(self.fixed::<4>("memo key")?) as u64,
        };
        self.memo_get(k)
    }

    /// GLOBAL (protocol 0-3, names on lines), STACK_GLOBAL (4-5, names on
    /// the stack): only allowlisted names resolve.
    fn op_global(&mut self, op: u8) -> Result<(), At> {
        let (module, name) = if op == b'c' {
            (self.line_str()?, self.line_str()?)
        } else {
            let name = self.pop()?;
            let module = self.pop()?;
            let (Some(module), Some(name)) = (self.text(module)?, self.text(name)?) else {
                return Err(self.err("STACK_GLOBAL expects two strings"));
            };
            (module, name)
        };
        let v = self.global(&module, &name)?;
        self.push(v)
    }

    /// REDUCE: calls an allowlisted global on an argument tuple.
    fn op_reduce(&mut self) -> Result<(), At> {
        let args = self.pop()?;
        let f = match self.pop()? {
            Value::Global(g) => g,
            other => return Err(self.err(format!("REDUCE on {other:?}: not a callable"))),
        };
        let v = self.call(f, args)?;
        self.push(v)
    }
}

/// Decodes a protocol 0 STRING argument (`'...'` or `"..."` with Python
/// escapes) in place; returns the decoded length.
fn unescape_string_in_place(b: &mut [u8]) -> Result<usize, (usize, String)> {
    let b_len = b.len();
    let b = if b_len > 0 && b[b_len - 1] == b'\r' {
        &mut b[..b_len - 1]
    } else {
        b
    };
    let n = b.len();
    if n < 2 || !(b[0] == b'\'' || b[0] == b'"') || b[n - 1] != b[0] {
        return Err((0, "STRING argument is not quoted".into()));
    }
    let (mut r, mut w) = (1, 0);
    let end = n - 1;
    while r < end {
        let c = b[r];
        if c != b'\\' {
            b[w] = c;
            w += 1;
            r += 1;
            continue;
        }
        if r + 1 >= end {
            return Err((r, "STRING ends in a lone backslash".into()));
        }
        let e = b[r + 1];
        r += 2;
        let out = match e {
            b'\\' => b'\\',
            b'\'' => b'\'',
            b'"' => b'"',
            b'a' => 7,
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'x' => {
                let h = |x: u8| (x as char).to_digit(16);
                match (
                    b.get(r).copied().and_then(h),
                    b.get(r + 1).copied().and_then(h),
                ) {
                    (Some(hi), Some(lo)) if r + 1 < end => {
                        r += 2;
                        (hi * 16 + lo) as u8
                    }
                    _ => return Err((r - 2, "invalid \\x escape in STRING".into())),
                }
            }
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    if r < end && (b'0'..=b'7').contains(&b[r]) {
                        v = v * 8 + (b[r] - b'0') as u32;
                        r += 1;
                    }
                }
                (v & 0xff) as u8
            }
            _ => {
                // Python keeps unknown escapes verbatim.
                b[w] = b'\\';
                w += 1;
                e
            }
        };
        b[w] = out;
        w += 1;
    }
    Ok(w)
}

/// Decodes raw-unicode-escape text in place. With `latin1`, writes one byte
/// per code point (failing above U+00FF), never more than it read. Without,
/// it collects UTF-8 (which can outgrow the input), so that mode is only used
/// on short copies (type codes, names).
fn decode_raw_unicode_escape(b: &mut [u8], latin1: bool) -> Result<usize, (usize, String)> {
    let n = b.len();
    let (mut r, mut w) = (0, 0);
    let mut utf8 = Vec::new();
    // Writes one code point; returns the new write position.
    let put = |b: &mut [u8],
               utf8: &mut Vec<u8>,
               w: usize,
               cp: u32,
               at: usize|
     -> Result<usize, (usize, String)> {
        if latin1 {
            if cp > 0xff {
                return Err((
                    at,
                    format!("code point U+{cp:04X} cannot be encoded as latin1"),
                ));
            }
            b[w] = cp as u8;
        } else {
            let ch = char::from_u32(cp).ok_or((at, format!("invalid code point {cp:#x}")))?;
            let mut tmp = [0u8; 4];
            utf8.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
        }
        Ok(w + 1)
    };
    while r < n {
        if b[r] != b'\\' {
            w = put(b, &mut utf8, w, b[r] as u32, r)?;
            r += 1;
            continue;
        }
        // As CPython: \u and \U are escapes only after an odd run of backslashes.
        let run = b[r..].iter().take_while(|&&c| c == b'\\').count();
        let esc = run % 2 == 1 && r + run < n && (b[r + run] == b'u' || b[r + run] == b'U');
        let literal = if esc { run - 1 } else { run };
        for _ in 0..literal {
            w = put(b, &mut utf8, w, b'\\' as u32, r)?;
            r += 1;
        }
        if !esc {
            continue;
        }
        let digits = if b[r + 1] == b'u' { 4 } else { 8 };
        let cp = b
            .get(r + 2..r + 2 + digits)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or((r, "truncated \\u escape in UNICODE text".to_string()))?;
        w = put(b, &mut utf8, w, cp, r)?;
        r += 2 + digits;
    }
    if !latin1 {
        if utf8.len() > n {
            return Err((0, "text too long to decode in place".into()));
        }
        b[..utf8.len()].copy_from_slice(&utf8);
        w = utf8.len();
    }
    Ok(w)
}

/// Rewrites UTF-8 text of code points <= U+00FF as latin1 bytes, in place.
/// Runs of ASCII are moved eight bytes at a time: Python 3's protocol 2
/// pickles carry every numpy payload this way.
fn utf8_to_latin1_in_place(b: &mut [u8]) -> Result<usize, (usize, String)> {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = b.len();
    let (mut r, mut w) = (0, 0);
    while r < n {
        if r + 8 <= n {
            let word = u64::from_ne_bytes(b[r..r + 8].try_into().unwrap());
            if word & HIGH == 0 {
                if r != w {
                    b.copy_within(r..r + 8, w);
                }
                r += 8;
                w += 8;
                continue;
            }
        }
        let c = b[r];
        if c < 0x80 {
            b[w] = c;
            r += 1;
        } else if (c == 0xc2 || c == 0xc3) && r + 1 < n && b[r + 1] & 0xc0 == 0x80 {
            b[w] = ((c & 0x03) << 6) | (b[r + 1] & 0x3f);
            r += 2;
        } else {
            return Err((r, "text is not latin1-encodable UTF-8 (expected bytes as _codecs.encode(str, 'latin1'))".into()));
        }
        w += 1;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses with the budget a load would give this input.
    fn read(p: &mut [u8]) -> Result<Parsed, At> {
        parse(p, &mut Work::for_input(p.len()))
    }

    #[test]
    fn string_escapes_decode_in_place() {
        let mut s = br"'a\x00\\\'b\n\101'".to_vec();
        let n = unescape_string_in_place(&mut s).unwrap();
        assert_eq!(&s[..n], b"a\x00\\'b\nA");
        let mut s = br#""it's""#.to_vec();
        let n = unescape_string_in_place(&mut s).unwrap();
        assert_eq!(&s[..n], b"it's");
    }

    #[test]
    fn latin1_conversions() {
        let mut t = "aé\u{ff}".as_bytes().to_vec();
        let n = utf8_to_latin1_in_place(&mut t).unwrap();
        assert_eq!(&t[..n], &[b'a', 0xe9, 0xff]);
        let mut t = b"x\\u005c\\u000a\xe9".to_vec();
        let n = decode_raw_unicode_escape(&mut t, true).unwrap();
        assert_eq!(&t[..n], &[b'x', b'\\', b'\n', 0xe9]);
        assert!(utf8_to_latin1_in_place(&mut "€".as_bytes().to_vec()).is_err());
    }

    #[test]
    fn refuses_foreign_globals_with_offset() {
        let mut p = b"\x80\x02cos\nsystem\nq\x00.".to_vec();
        let e = read(&mut p).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.what.contains("os.system"), "{}", e.what);
        let mut p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.".to_vec();
        let e = read(&mut p).unwrap_err();
        assert!(e.what.contains("builtins.eval"), "{}", e.what);
    }

    #[test]
    fn huge_declared_length_fails_without_allocating() {
        let mut p = b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.".to_vec();
        let e = read(&mut p).unwrap_err();
        assert_eq!(e.offset, 11);
        assert!(e.what.contains("only 1 remain"), "{}", e.what);
    }

    #[test]
    fn memo_reference_shares_payload() {
        // ((b'xyz', b'xyz'),) where the second is BINGET of the first
        let mut p = b"\x80\x03C\x03xyzq\x00h\x00\x86q\x01.".to_vec();
        let parsed = read(&mut p).unwrap();
        let Value::Obj(id) = parsed.root else {
            panic!()
        };
        let Object::Tuple(items) = parsed.obj(id) else {
            panic!()
        };
        assert_eq!(items[0], items[1]);
    }

    #[test]
    fn deep_marks_are_bounded() {
        let mut p = vec![b'('; MAX_MARK_DEPTH + 1];
        let e = read(&mut p).unwrap_err();
        assert!(e.what.contains("nested MARKs"), "{}", e.what);
    }

    /// An empty uint8 array through `_reconstruct` + BUILD whose shape is
    /// `nd` dimensions of 1 (DUPs), then `tail` (the array stays on top).
    fn array_with_dims(nd: usize, tail: &[u8]) -> Vec<u8> {
        let mut p =
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
                .to_vec();
        p.extend(b"(K\x01(K\x01");
        p.extend(std::iter::repeat_n(b'2', nd - 1));
        p.extend(b"tcnumpy\ndtype\nU\x02u1\x89\x88\x87R");
        p.extend(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb");
        p.extend(b"\x89U\x01\x00tq\x00b");
        p.extend(tail);
        p
    }

    #[test]
    fn shapes_are_capped_at_numpys_dimension_limit() {
        let mut p = array_with_dims(MAX_DIMS, b".");
        let parsed = read(&mut p).unwrap();
        let Value::Obj(id) = parsed.root else {
            panic!()
        };
        let Object::Array(a) = parsed.obj(id) else {
            panic!()
        };
        assert_eq!(a.shape, vec![1; MAX_DIMS]);

        let mut p = array_with_dims(MAX_DIMS + 1, b".");
        let build = p.len() - 2;
        assert_eq!(p[build], b'b');
        let e = read(&mut p).unwrap_err();
        assert_eq!(e.offset, build as u64);
        assert_eq!(
            e.what,
            "array shape has 65 dimensions, more than numpy's limit of 64"
        );
    }

    #[test]
    fn shared_tuples_cost_the_same_however_often_they_are_used() {
        // The steps of `uses` more BUILDs (or REDUCEs) of one memoized tuple
        // of `width` items, per use.
        fn per_use(stream: impl Fn(usize) -> Vec<u8>, uses: usize) -> u64 {
            let steps = |n| {
                let mut p = stream(n);
                let mut work = Work::for_input(p.len());
                parse(&mut p, &mut work).unwrap();
                work.used()
            };
            (steps(2 * uses) - steps(uses)) / uses as u64
        }
        let width = 100_000;
        // dtype BUILD with a state padded to `width` items
        let build = |uses: usize| {
            let mut p = b"\x80\x02cnumpy\ndtype\nU\x02f4\x89\x88\x87R".to_vec();
            p.extend(b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00");
            p.extend(std::iter::repeat_n(b'2', width - 8));
            p.extend(b"tq\x00b");
            p.extend(b"h\x00b".repeat(uses));
            p.push(b'.');
            p
        };
        assert!(per_use(build, 1000) <= 4);
        // numpy.dtype REDUCE with arguments padded to `width` items
        let reduce = |uses: usize| {
            let mut p = b"\x80\x02cnumpy\ndtype\nq\x00(U\x02f4\x89".to_vec();
            p.extend(std::iter::repeat_n(b'2', width - 2));
            p.extend(b"tq\x01R");
            p.extend(b"0h\x00h\x01R".repeat(uses));
            p.push(b'.');
            p
        };
        assert!(per_use(reduce, 1000) <= 8);
        // an array BUILD whose shared state nests its shape: BUILD again
        let array = |uses: usize| {
            array_with_dims(MAX_DIMS, &[b"h\x00b".repeat(uses), b".".to_vec()].concat())
        };
        assert!(per_use(array, 1000) <= 4 + MAX_DIMS as u64);
    }

    #[test]
    fn names_longer_than_max_name_are_refused() {
        let mut p = b"\x80\x02cnumpy\ndtype\nX".to_vec();
        p.extend(300u32.to_le_bytes());
        p.extend([b'f'; 300]);
        p.extend(b"\x85R.");
        let reduce = p.len() - 2;
        let e = read(&mut p).unwrap_err();
        assert_eq!(e.offset, reduce as u64);
        assert!(e.what.contains("text of 300 bytes"), "{}", e.what);
    }

    #[test]
    fn work_budget_stops_at_the_opcode_that_exceeds_it() {
        // PROTO, MARK and three BININT1 take 5 steps; TUPLE is the 6th.
        let mut p = b"\x80\x02(K\x01K\x02K\x03t.".to_vec();
        let mut work = Work::with_limit(5);
        let e = parse(&mut p, &mut work).unwrap_err();
        assert_eq!(e.offset, 9);
        assert!(
            e.what.contains("work budget of 5 steps exceeded"),
            "{}",
            e.what
        );
        assert!(work.exceeded());
        let mut work = Work::with_limit(100);
        parse(&mut p, &mut work).unwrap();
        assert!(!work.exceeded());
    }

    #[test]
    fn trailing_bytes_and_missing_stop() {
        let mut p = b"N.x".to_vec();
        assert!(read(&mut p)
            .unwrap_err()
            .what
            .contains("after the pickle's STOP"));
        let mut p = b"\x80\x02N".to_vec();
        let e = read(&mut p).unwrap_err();
        assert!(e.what.contains("without a STOP"), "{}", e.what);
    }
}
