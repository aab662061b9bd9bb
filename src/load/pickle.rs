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
use std::collections::HashMap;

use crate::load::error::At;

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
/// holds one pickle.
pub fn parse(buf: &mut [u8]) -> Result<Parsed, At> {
    let mut r = Reader {
        buf,
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

impl Reader<'_> {
    fn err(&self, what: impl Into<String>) -> At {
        At::new(self.op_at, what)
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
        Ok(self.stack.split_off(m))
    }

    fn charge(&mut self, n: usize) -> Result<(), At> {
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

    fn text(&self, v: &Value) -> Option<String> {
        match *v {
            Value::Bytes(s) => Some(
                self.buf[s.start..s.end]
                    .iter()
                    .map(|&b| b as char)
                    .collect(),
            ),
            Value::Str(s, TextEnc::Utf8) => std::str::from_utf8(&self.buf[s.start..s.end])
                .ok()
                .map(str::to_owned),
            Value::Str(s, TextEnc::RawUnicodeEscape) => {
                let mut out = self.buf[s.start..s.end].to_vec();
                let n = decode_raw_unicode_escape(&mut out, false).ok()?;
                std::str::from_utf8(&out[..n]).ok().map(str::to_owned)
            }
            _ => None,
        }
    }

    fn tuple_items(&self, v: Value, what: &str) -> Result<Vec<Value>, At> {
        match v {
            Value::Obj(id) => match &self.objects[id as usize].0 {
                Object::Tuple(items) => Ok(items.clone()),
                o => Err(self.err(format!("{what}: expected a tuple, found a {}", o.kind()))),
            },
            other => Err(self.err(format!("{what}: expected a tuple, found {other:?}"))),
        }
    }

    fn int(&self, v: Value, what: &str) -> Result<i64, At> {
        match v {
            Value::Int(i) => Ok(i),
            Value::Bool(b) => Ok(b as i64),
            other => Err(self.err(format!("{what}: expected an int, found {other:?}"))),
        }
    }

    fn shape(&self, v: Value) -> Result<Vec<usize>, At> {
        let items = self.tuple_items(v, "array shape")?;
        items
            .into_iter()
            .map(|d| {
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

    fn call(&mut self, f: Global, args: Value) -> Result<Value, At> {
        let a = self.tuple_items(args, "REDUCE arguments")?;
        match f {
            Global::Reconstruct => {
                if a.first() != Some(&Value::Global(Global::NdArray)) {
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
            Global::DType => {
                let code = a
                    .first()
                    .and_then(|v| self.text(v))
                    .ok_or_else(|| self.err("numpy.dtype expects a type code string"))?;
                let (byteorder, code) = match code.as_bytes().first() {
                    Some(&b @ (b'<' | b'>' | b'|' | b'=')) => (b, code[1..].to_string()),
                    _ => (b'=', code),
                };
                self.new_obj(Object::DType(DTypeObj { code, byteorder }))
            }
            Global::FromBuffer => {
                if a.len() != 4 {
                    return Err(self.err(format!(
                        "_frombuffer expects (buffer, dtype, shape, order), got {} arguments",
                        a.len()
                    )));
                }
                let data = match a[0] {
                    Value::Bytes(s) => s,
                    other => {
                        return Err(self.err(format!(
                            "_frombuffer expects an in-band buffer, found {other:?}"
                        )))
                    }
                };
                let dtype = self.dtype_of(a[1])?;
                let shape = self.shape(a[2])?;
                let order = self.text(&a[3]).unwrap_or_default();
                let fortran = match order.as_str() {
                    "C" => false,
                    "F" => true,
                    o => {
                        return Err(
                            self.err(format!("_frombuffer order must be 'C' or 'F', found {o:?}"))
                        )
                    }
                };
                self.new_obj(Object::Array(ArrayObj {
                    dtype: Some(dtype),
                    shape,
                    fortran,
                    data: Some(data),
                }))
            }
            Global::Scalar => {
                let dtype = self.dtype_of(*a.first().unwrap_or(&Value::None))?;
                let data = match a.get(1) {
                    Some(&Value::Bytes(s)) => s,
                    Some(&v @ Value::Str(..)) => match self.encode_latin1(v)? {
                        Value::Bytes(s) => s,
                        _ => unreachable!(),
                    },
                    _ => return Err(self.err("numpy scalar expects (dtype, bytes)")),
                };
                self.new_obj(Object::Scalar(dtype, data))
            }
            Global::CodecsEncode => {
                let enc = a.get(1).and_then(|v| self.text(v)).unwrap_or_default();
                if !matches!(
                    enc.to_ascii_lowercase().as_str(),
                    "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1"
                ) {
                    return Err(self.err(format!(
                        "_codecs.encode with encoding {enc:?}: only latin1 is understood"
                    )));
                }
                self.encode_latin1(*a.first().unwrap_or(&Value::None))
            }
            Global::Set => {
                let items = match a.first() {
                    None => Vec::new(),
                    Some(Value::Obj(id)) => match &self.objects[*id as usize].0 {
                        Object::List(v) | Object::Tuple(v) | Object::Set(v) => v.clone(),
                        o => return Err(self.err(format!("set() of a {}", o.kind()))),
                    },
                    Some(v) => return Err(self.err(format!("set() of {v:?}"))),
                };
                self.new_obj(Object::Set(items))
            }
            Global::ByteArray => match a.first() {
                None => Ok(Value::Bytes(Span {
                    start: self.op_at,
                    end: self.op_at,
                })),
                Some(&Value::Bytes(s)) => Ok(Value::Bytes(s)),
                Some(&v @ Value::Str(..)) => self.encode_latin1(v),
                Some(v) => Err(self.err(format!("bytearray() of {v:?}"))),
            },
            Global::NdArray => Err(self.err("calling numpy.ndarray directly is not supported")),
        }
    }

    fn build(&mut self, target: Value, state: Value) -> Result<(), At> {
        let id = match target {
            Value::Obj(id) => id as usize,
            other => {
                return Err(self.err(format!(
                    "BUILD on {other:?}: only numpy arrays and dtypes take state"
                )))
            }
        };
        let st = self.tuple_items(state, "BUILD state")?;
        match &self.objects[id].0 {
            Object::DType(_) => {
                // (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
                if st.len() < 5 {
                    return Err(self.err(format!(
                        "numpy dtype state has {} items, expected 8 or 9",
                        st.len()
                    )));
                }
                let order = self
                    .text(&st[1])
                    .ok_or_else(|| self.err("numpy dtype state: byte order is not a string"))?;
                if st[2] != Value::None || st[3] != Value::None || st[4] != Value::None {
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
            Object::Array(_) => {
                // (version, shape, dtype, is_fortran, data) or, from old numpy, without version.
                let st = match st.len() {
                    5 => &st[1..],
                    4 => &st[..],
                    n => {
                        return Err(self.err(format!("numpy array state has {n} items, expected 5")))
                    }
                };
                let shape = self.shape(st[0])?;
                let dtype = self.dtype_of(st[1])?;
                let fortran = match st[2] {
                    Value::Bool(b) => b,
                    Value::Int(i) => i != 0,
                    other => {
                        return Err(self.err(format!("numpy array state: is_fortran is {other:?}")))
                    }
                };
                let data = match st[3] {
                    Value::Bytes(s) => s,
                    v @ Value::Str(..) => match self.encode_latin1(v)? {
                        Value::Bytes(s) => s,
                        _ => unreachable!(),
                    },
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
            o => Err(self.err(format!(
                "BUILD on a {}: only numpy arrays and dtypes take state",
                o.kind()
            ))),
        }
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
            match op {
                0x80 => {
                    let [v] = self.fixed::<1>("protocol version")?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is newer than 5")));
                    }
                    self.protocol = v;
                }
                0x95 => {
                    let n = u64::from_le_bytes(self.fixed::<8>("frame length")?);
                    let avail = (self.buf.len() - self.pos) as u64;
                    if n > avail {
                        return Err(self.err(format!(
                            "FRAME declares {n} bytes, but only {avail} remain (truncated)"
                        )));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.marks.is_empty() {
                        return Err(self.err("STOP with a MARK still open"));
                    }
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARK_DEPTH {
                        return Err(self.err(format!("more than {MAX_MARK_DEPTH} nested MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    // POP discards the top item, or the topmost mark if the
                    // stack is empty above it.
                    let floor = self.marks.last().copied();
                    if floor == Some(self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
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
                b'I' => {
                    let t = self.line_str()?;
                    let v = match t.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(t.parse().map_err(|_| {
                            self.err(format!("INT argument {t:?} is not a 64-bit integer"))
                        })?),
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let t = self.line_str()?;
                    let t2 = t.strip_suffix('L').unwrap_or(&t);
                    let v = t2.parse().map_err(|_| {
                        self.err(format!("LONG argument {t:?} is not a 64-bit integer"))
                    })?;
                    self.push(Value::Int(v))?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.fixed::<4>("int")?);
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let [v] = self.fixed::<1>("int")?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.fixed::<2>("int")?);
                    self.push(Value::Int(v as i64))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.fixed::<1>("length")?[0] as u64
                    } else {
                        let n = i32::from_le_bytes(self.fixed::<4>("length")?);
                        u64::try_from(n).map_err(|_| self.err("LONG4 with a negative length"))?
                    };
                    let s = self.len_u64(n, "integer")?;
                    if s.len() > 8 {
                        return Err(
                            self.err(format!("integer of {} bytes does not fit 64 bits", s.len()))
                        );
                    }
                    let b = &self.buf[s.start..s.end];
                    let mut full = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    full[..b.len()].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(full)))?;
                }
                b'F' => {
                    let t = self.line_str()?;
                    let v = t
                        .trim()
                        .parse::<f64>()
                        .map_err(|_| self.err(format!("FLOAT argument {t:?} is not a number")))?;
                    self.push(Value::Float(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.fixed::<8>("float")?);
                    self.push(Value::Float(v))?;
                }
                b'S' => {
                    let s = self.line()?;
                    let n = unescape_string_in_place(&mut self.buf[s.start..s.end])
                        .map_err(|(at, what)| At::new(s.start + at, what))?;
                    self.push(Value::Bytes(Span {
                        start: s.start,
                        end: s.start + n,
                    }))?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.fixed::<4>("length")?);
                    let n = u64::try_from(n)
                        .map_err(|_| self.err("BINSTRING with a negative length"))?;
                    let s = self.len_u64(n, "string")?;
                    self.push(Value::Bytes(s))?;
                }
                b'U' | b'C' => {
                    let [n] = self.fixed::<1>("length")?;
                    let s = self.take(n as usize, "bytes")?;
                    self.push(Value::Bytes(s))?;
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.fixed::<4>("length")?);
                    let s = self.len_u64(n as u64, "bytes")?;
                    self.push(Value::Bytes(s))?;
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.fixed::<8>("length")?);
                    let s = self.len_u64(n, "bytes")?;
                    self.push(Value::Bytes(s))?;
                }
                b'V' => {
                    let s = self.line()?;
                    self.push(Value::Str(s, TextEnc::RawUnicodeEscape))?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.fixed::<4>("length")?);
                    let s = self.len_u64(n as u64, "text")?;
                    self.push(Value::Str(s, TextEnc::Utf8))?;
                }
                0x8c => {
                    let [n] = self.fixed::<1>("length")?;
                    let s = self.take(n as usize, "text")?;
                    self.push(Value::Str(s, TextEnc::Utf8))?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.fixed::<8>("length")?);
                    let s = self.len_u64(n, "text")?;
                    self.push(Value::Str(s, TextEnc::Utf8))?;
                }
                0x98 => {
                    // READONLY_BUFFER: only marks the top buffer read-only.
                    match self.top()? {
                        Value::Bytes(_) => {}
                        other => return Err(self.err(format!("READONLY_BUFFER on {other:?}"))),
                    }
                }
                b')' => {
                    let v = self.new_obj(Object::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(
                            self.err(format!("{} needs {n} values on the stack", op_name(op)))
                        );
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.new_obj(Object::Tuple(items))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Object::Tuple(items))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.new_obj(Object::List(Vec::new()))?;
                    self.push(v)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Object::List(items))?;
                    self.push(v)?;
                }
                b'}' => {
                    let v = self.new_obj(Object::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Object::Dict(Vec::new()))?;
                    self.set_items(v, items)?;
                    self.push(v)?;
                }
                0x8f => {
                    let v = self.new_obj(Object::Set(Vec::new()))?;
                    self.push(v)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Object::Set(items))?;
                    self.push(v)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.extend(list, vec![item])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend(list, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b'p' => {
                    let t = self.line_str()?;
                    let k = t.parse().map_err(|_| self.err(format!("PUT key {t:?}")))?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let [k] = self.fixed::<1>("memo key")?;
                    self.memo_put(k as u64)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.fixed::<4>("memo key")?);
                    self.memo_put(k as u64)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let t = self.line_str()?;
                    let k = t.parse().map_err(|_| self.err(format!("GET key {t:?}")))?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let [k] = self.fixed::<1>("memo key")?;
                    self.memo_get(k as u64)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.fixed::<4>("memo key")?);
                    self.memo_get(k as u64)?;
                }
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let v = self.global(&module, &name)?;
                    self.push(v)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (self.text(&module), self.text(&name)) else {
                        return Err(self.err("STACK_GLOBAL expects two strings"));
                    };
                    let v = self.global(&module, &name)?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = match self.pop()? {
                        Value::Global(g) => g,
                        other => {
                            return Err(self.err(format!("REDUCE on {other:?}: not a callable")))
                        }
                    };
                    let v = self.call(f, args)?;
                    self.push(v)?;
                }
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
        let e = parse(&mut p).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.what.contains("os.system"), "{}", e.what);
        let mut p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.".to_vec();
        let e = parse(&mut p).unwrap_err();
        assert!(e.what.contains("builtins.eval"), "{}", e.what);
    }

    #[test]
    fn huge_declared_length_fails_without_allocating() {
        let mut p = b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.".to_vec();
        let e = parse(&mut p).unwrap_err();
        assert_eq!(e.offset, 11);
        assert!(e.what.contains("only 1 remain"), "{}", e.what);
    }

    #[test]
    fn memo_reference_shares_payload() {
        // ((b'xyz', b'xyz'),) where the second is BINGET of the first
        let mut p = b"\x80\x03C\x03xyzq\x00h\x00\x86q\x01.".to_vec();
        let parsed = parse(&mut p).unwrap();
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
        let e = parse(&mut p).unwrap_err();
        assert!(e.what.contains("nested MARKs"), "{}", e.what);
    }

    #[test]
    fn trailing_bytes_and_missing_stop() {
        let mut p = b"N.x".to_vec();
        assert!(parse(&mut p)
            .unwrap_err()
            .what
            .contains("after the pickle's STOP"));
        let mut p = b"\x80\x02N".to_vec();
        let e = parse(&mut p).unwrap_err();
        assert!(e.what.contains("without a STOP"), "{}", e.what);
    }
}
