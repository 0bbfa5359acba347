//! Pre-load fix-up that lets aya 0.14 load C objects calling kernel kfuncs.
//!
//! clang emits a call to an `extern ... __ksym` function as a local call
//! (`src_reg` 1, `imm` -1) with an `R_BPF_64_32` relocation against an
//! undefined symbol, and lists the externs in a `.ksyms` DATASEC that has no
//! ELF section. aya 0.14 handles neither: its BTF fix-up cannot size
//! `.ksyms`, and its linker finds no function at the call target. This module
//! does on the ELF bytes what libbpf does at load time. Nothing changes size,
//! so the object is patched in place:
//!
//! - each call becomes a kfunc call: `src_reg` = `BPF_PSEUDO_KFUNC_CALL`,
//!   `imm` = the kfunc's BTF id, `off` = 0 (vmlinux BTF, so no `fd_array`,
//!   which aya cannot pass; module kfuncs stay out of reach);
//! - its relocation is removed, so aya's linker leaves the call alone;
//! - in `.BTF`, extern FUNCs become global (the kernel rejects extern
//!   linkage) and the `.ksyms` DATASEC becomes an anonymous STRUCT of the
//!   same encoded size, as libbpf also replaces it by something loadable.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use object::{
    Endian, Endianness, SectionIndex, SymbolIndex,
    elf::{self, FileHeader64, Rel64},
    read::elf::{FileHeader, Rel, SectionHeader, Sym},
};

use crate::error::UserError;

/// `src_reg` of a call to a kernel function identified by BTF id.
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// `BPF_JMP | BPF_CALL | BPF_K`.
const BPF_CALL_OPCODE: u8 = 0x85;
const INSN_SIZE: usize = 8;
const REL_SIZE: usize = size_of::<Rel64<Endianness>>();
/// Offset of `sh_size` in an `Elf64_Shdr`.
const SHDR_SIZE_OFFSET: usize = 32;

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_HEADER_LEN: usize = 24;
const BTF_TYPE_LEN: usize = 12;
const BTF_KIND_INT: u32 = 1;
const BTF_KIND_STRUCT: u32 = 4;
const BTF_KIND_FUNC: u32 = 12;
const BTF_KIND_DATASEC: u32 = 15;
const BTF_FUNC_GLOBAL: u32 = 1;
const BTF_FUNC_EXTERN: u32 = 2;

/// Patches the kfunc calls of `object` with the ids of vmlinux BTF.
pub fn relocate_kfuncs(object: &[u8]) -> Result<Vec<u8>> {
    let vmlinux = aya_obj::btf::Btf::from_sys_fs()
        .context("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux), needed to call kfuncs")?;
    relocate_kfuncs_with(object, |name| vmlinux.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func).ok())
}

/// Patches the kfunc calls of `object`, asking `resolve` for the BTF id of
/// each kfunc by name (separate from [`relocate_kfuncs`] to test without a kernel).
pub fn relocate_kfuncs_with(object: &[u8], resolve: impl Fn(&str) -> Option<u32>) -> Result<Vec<u8>> {
    let header = FileHeader64::<Endianness>::parse(object).context("the eBPF object is not a 64-bit ELF file")?;
    let endian = header.endian()?;
    let sections = header.sections(endian, object)?;
    let symbols = sections.symbols(endian, object, elf::SHT_SYMTAB)?;
    let shoff = to_usize(header.e_shoff(endian))?;
    let shentsize = usize::from(header.e_shentsize(endian));
    let mut out = object.to_vec();
    let mut missing = BTreeSet::new();

    for (rel_index, rel_section) in sections.iter().enumerate() {
        if rel_section.sh_type(endian) != elf::SHT_REL {
            continue;
        }
        let target = sections.section(SectionIndex(to_usize(rel_section.sh_info(endian))?))?;
        // Only code: .rel.BTF, .rel.BTF.ext and debug relocations stay as they are.
        if target.sh_flags(endian) & u64::from(elf::SHF_EXECINSTR) == 0 {
            continue;
        }
        let code = target.data(endian, object)?;
        let code_at = to_usize(target.sh_offset(endian))?;
        let rels_at = to_usize(rel_section.sh_offset(endian))?;
        let rels: &[Rel64<Endianness>] = rel_section.data_as_array(endian, object)?;
        let mut kept = Vec::with_capacity(rels.len());
        for (i, rel) in rels.iter().enumerate() {
            match kfunc_call(rel, &symbols, code, endian)? {
                None => kept.push(i),
                Some((name, off)) => match resolve(name) {
                    Some(id) => patch_call(&mut out[code_at + off..code_at + off + INSN_SIZE], id, endian),
                    None => {
                        missing.insert(name.to_owned());
                    }
                },
            }
        }
        if kept.len() != rels.len() {
            // Compact the kept entries to the front and shrink the section: aya
            // then never sees the relocations of the patched calls.
            let kept_bytes: Vec<u8> = kept
                .iter()
                .flat_map(|&i| &object[rels_at + i * REL_SIZE..rels_at + (i + 1) * REL_SIZE])
                .copied()
                .collect();
            let region = &mut out[rels_at..rels_at + rels.len() * REL_SIZE];
            region.fill(0);
            region[..kept_bytes.len()].copy_from_slice(&kept_bytes);
            let size_at = shoff + rel_index * shentsize + SHDR_SIZE_OFFSET;
            out[size_at..size_at + 8].copy_from_slice(&endian.write_u64_bytes(u64::try_from(kept_bytes.len())?));
        }
    }
    if !missing.is_empty() {
        let names: Vec<_> = missing.into_iter().collect();
        bail!(UserError::Unsupported(format!(
            "kernel function {} not in the kernel's vmlinux BTF (kernel too old, conntrack not built in, \
             or only in a module's BTF, which aya 0.14 cannot use)",
            names.join(", ")
        )));
    }

    if let Some((_, btf_section)) = sections.section_by_name(endian, b".BTF") {
        let at = to_usize(btf_section.sh_offset(endian))?;
        let len = to_usize(btf_section.sh_size(endian))?;
        let btf = out.get_mut(at..at + len).context(".BTF section outside the file")?;
        fix_btf(btf, endian).context("cannot fix up the object's .BTF for kfuncs")?;
    }
    Ok(out)
}

/// The kfunc a relocation calls and the offset of its call instruction;
/// None for a relocation against a defined symbol, which stays.
fn kfunc_call<'a>(
    rel: &Rel64<Endianness>,
    symbols: &object::read::elf::SymbolTable<'a, FileHeader64<Endianness>>,
    code: &[u8],
    endian: Endianness,
) -> Result<Option<(&'a str, usize)>> {
    let sym_index = to_usize(rel.r_sym(endian))?;
    if sym_index == 0 {
        return Ok(None);
    }
    let sym = symbols.symbol(SymbolIndex(sym_index))?;
    if !sym.is_undefined(endian) {
        return Ok(None);
    }
    let name = std::str::from_utf8(symbols.symbol_name(endian, sym)?).context("extern symbol with a non-UTF-8 name")?;
    let off = to_usize(rel.r_offset(endian))?;
    let insn = code.get(off..off + INSN_SIZE).with_context(|| format!("relocation for `{name}` points outside its section"))?;
    if rel.r_type(endian) != elf::R_BPF_64_32 || insn[0] != BPF_CALL_OPCODE {
        bail!(UserError::Unsupported(format!(
            "the eBPF object uses extern `{name}` other than as a called kfunc; aya 0.14 cannot link that"
        )));
    }
    Ok(Some((name, off)))
}

/// Turns the call instruction `insn` into a call of kfunc `id` in vmlinux.
fn patch_call(insn: &mut [u8], id: u32, endian: Endianness) {
    // The register byte holds dst and src nibbles, in an endian-dependent order.
    insn[1] = if endian.is_little_endian() {
        (insn[1] & 0x0f) | (BPF_PSEUDO_KFUNC_CALL << 4)
    } else {
        (insn[1] & 0xf0) | BPF_PSEUDO_KFUNC_CALL
    };
    insn[2..4].copy_from_slice(&endian.write_u16_bytes(0));
    insn[4..8].copy_from_slice(&endian.write_u32_bytes(id));
}

/// Where one BTF type is encoded, and the parts of it the fix-up needs.
struct BtfTypeAt {
    at: usize,
    kind: u32,
    vlen: u32,
    name_off: u32,
    size: u32,
    int_bits: u32,
}

/// Extern FUNCs become global; the `.ksyms` DATASEC becomes an anonymous
/// STRUCT whose members (named after the kfuncs) all have a plain INT type.
fn fix_btf(btf: &mut [u8], endian: Endianness) -> Result<()> {
    let layout = BtfLayout::parse(btf, endian)?;
    for t in layout.types.iter().filter(|t| t.kind == BTF_KIND_FUNC && t.vlen == BTF_FUNC_EXTERN) {
        put_u32(btf, t.at + 4, (BTF_KIND_FUNC << 24) | BTF_FUNC_GLOBAL, endian);
    }
    for t in &layout.types {
        if t.kind == BTF_KIND_DATASEC && layout.name(btf, t.name_off)? == ".ksyms" {
            ksyms_to_struct(btf, &layout, t, endian)?;
        }
    }
    Ok(())
}

/// The types and string section of an object's `.BTF`.
struct BtfLayout {
    types: Vec<BtfTypeAt>,
    strings_start: usize,
    strings_end: usize,
}

impl BtfLayout {
    fn parse(btf: &[u8], endian: Endianness) -> Result<Self> {
        let magic = btf.get(..2).map(|b| endian.read_u16_bytes([b[0], b[1]]));
        ensure!(magic == Some(BTF_MAGIC), "bad BTF magic");
        let hdr_len = to_usize(get_u32(btf, 4, endian)?)?;
        ensure!(hdr_len >= BTF_HEADER_LEN, "BTF header too short");
        let types_start = hdr_len + to_usize(get_u32(btf, 8, endian)?)?;
        let types_end = types_start + to_usize(get_u32(btf, 12, endian)?)?;
        let strings_start = hdr_len + to_usize(get_u32(btf, 16, endian)?)?;
        let strings_end = strings_start + to_usize(get_u32(btf, 20, endian)?)?;
        ensure!(types_end <= btf.len() && strings_end <= btf.len(), "BTF sections exceed .BTF");

        let mut types = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let name_off = get_u32(btf, at, endian)?;
            let info = get_u32(btf, at + 4, endian)?;
            let size = get_u32(btf, at + 8, endian)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let n = to_usize(vlen)?;
            let extra = match kind {
                BTF_KIND_INT | 14 /* VAR */ | 17 /* DECL_TAG */ => 4,
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                3 /* ARRAY */ => 12,
                BTF_KIND_STRUCT | 5 /* UNION */ | BTF_KIND_DATASEC | 19 /* ENUM64 */ => 12 * n,
                6 /* ENUM */ | 13 /* FUNC_PROTO */ => 8 * n,
                other => bail!("unknown BTF kind {other}"),
            };
            let int_bits = if kind == BTF_KIND_INT { get_u32(btf, at + BTF_TYPE_LEN, endian)? } else { 0 };
            types.push(BtfTypeAt { at, kind, vlen, name_off, size, int_bits });
            at += BTF_TYPE_LEN + extra;
        }
        ensure!(at == types_end, "BTF type section is truncated");
        Ok(Self { types, strings_start, strings_end })
    }

    fn name(&self, btf: &[u8], off: u32) -> Result<String> {
        let start = self.strings_start + to_usize(off)?;
        let bytes = btf.get(start..self.strings_end).context("BTF name outside the string section")?;
        let end = bytes.iter().position(|&b| b == 0).context("unterminated BTF name")?;
        Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }
}

/// Rewrites the `.ksyms` DATASEC `t` in place as a same-size anonymous STRUCT.
fn ksyms_to_struct(btf: &mut [u8], layout: &BtfLayout, t: &BtfTypeAt, endian: Endianness) -> Result<()> {
    // A whole-byte, unshifted INT, as the kernel accepts for a struct member
    // (libbpf picks one for the same purpose).
    let (int_id, int) = layout
        .types
        .iter()
        .enumerate()
        .find(|(_, i)| {
            i.kind == BTF_KIND_INT && i.int_bits & 0x00ff_0000 == 0 && u64::from(i.int_bits & 0xff) == u64::from(i.size) * 8
        })
        .context("the object's BTF has no integer type to stand in for .ksyms")?;
    let int_id = u32::try_from(int_id + 1)?;
    put_u32(btf, t.at, 0, endian);
    put_u32(btf, t.at + 4, (BTF_KIND_STRUCT << 24) | t.vlen, endian);
    put_u32(btf, t.at + 8, int.size, endian);
    for i in 0..to_usize(t.vlen)? {
        let entry = t.at + BTF_TYPE_LEN + 12 * i;
        let member_type = to_usize(get_u32(btf, entry, endian)?)?;
        let func =
            member_type.checked_sub(1).and_then(|i| layout.types.get(i)).context(".ksyms refers to a missing BTF type")?;
        if func.kind != BTF_KIND_FUNC {
            bail!(UserError::Unsupported(format!(
                "the eBPF object declares extern variable `{}` (__ksym); only kfuncs are supported",
                layout.name(btf, func.name_off)?
            )));
        }
        // btf_member {name_off, type, offset}: all at offset 0, like a union.
        put_u32(btf, entry, func.name_off, endian);
        put_u32(btf, entry + 4, int_id, endian);
        put_u32(btf, entry + 8, 0, endian);
    }
    Ok(())
}

fn get_u32(bytes: &[u8], at: usize, endian: Endianness) -> Result<u32> {
    let b = bytes.get(at..at + 4).context("BTF truncated")?;
    Ok(endian.read_u32_bytes([b[0], b[1], b[2], b[3]]))
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32, endian: Endianness) {
    bytes[at..at + 4].copy_from_slice(&endian.write_u32_bytes(value));
}

fn to_usize(v: impl TryInto<usize>) -> Result<usize> {
    v.try_into().ok().context("ELF value does not fit in usize")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use natfix_ebpf::objects::{GUARD_TC_CT, GUARD_XDP_CT};
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

    use super::*;

    fn fake_id(name: &str) -> Option<u32> {
        match name {
            "bpf_xdp_ct_lookup" => Some(70_001),
            "bpf_skb_ct_lookup" => Some(70_002),
            "bpf_ct_release" => Some(70_003),
            _ => None,
        }
    }

    /// Relocations in code sections as (section, offset, symbol name, symbol undefined),
    /// read with `object`'s generic reader, independent of the code under test.
    fn code_relocations(bytes: &[u8]) -> Vec<(String, u64, String, bool)> {
        let file = object::File::parse(bytes).unwrap();
        let mut found = Vec::new();
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            for (off, rel) in section.relocations() {
                let RelocationTarget::Symbol(i) = rel.target() else { continue };
                let sym = file.symbol_by_index(i).unwrap();
                found.push((
                    section.name().unwrap().to_owned(),
                    off,
                    sym.name().unwrap().to_owned(),
                    sym.is_undefined(),
                ));
            }
        }
        found
    }

    fn section_data<'a>(bytes: &'a [u8], name: &str) -> &'a [u8] {
        object::File::parse(bytes).unwrap().section_by_name(name).unwrap().data().unwrap()
    }

    /// `(opcode, dst_reg, src_reg, off, imm)` of the little-endian instruction at `off`.
    fn insn(code: &[u8], off: u64) -> (u8, u8, u8, i16, i32) {
        let i = usize::try_from(off).unwrap();
        let b = &code[i..i + 8];
        (b[0], b[1] & 0x0f, b[1] >> 4, i16::from_le_bytes([b[2], b[3]]), i32::from_le_bytes([b[4], b[5], b[6], b[7]]))
    }

    fn check_patched(object: &[u8], lookup: &str) {
        let before = code_relocations(object);
        let calls: Vec<_> = before.iter().filter(|r| r.3).collect();
        let names: BTreeSet<&str> = calls.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(names, BTreeSet::from([lookup, "bpf_ct_release"]), "kfuncs the C code calls");

        let out = relocate_kfuncs_with(object, fake_id).unwrap();
        assert_eq!(out.len(), object.len());

        let mut patched: BTreeMap<&str, HashSet<u64>> = BTreeMap::new();
        for (section, off, name, _) in &calls {
            // What clang emitted: a local call to -1.
            assert_eq!(insn(section_data(object, section), *off), (BPF_CALL_OPCODE, 0, 1, 0, -1));
            let expected = i32::try_from(fake_id(name).unwrap()).unwrap();
            assert_eq!(
                insn(section_data(&out, section), *off),
                (BPF_CALL_OPCODE, 0, BPF_PSEUDO_KFUNC_CALL, 0, expected),
                "call of {name} at {section}+{off:#x}"
            );
            patched.entry(section).or_default().insert(*off);
        }
        // Nothing else in the code changed.
        for (section, offs) in &patched {
            let (a, b) = (section_data(object, section), section_data(&out, section));
            for (i, (x, y)) in a.chunks(8).zip(b.chunks(8)).enumerate() {
                if !offs.contains(&(i as u64 * 8)) {
                    assert_eq!(x, y, "{section} insn {i} changed");
                }
            }
        }
        // The kfunc relocations are gone, all others (maps, globals) are intact.
        let after = code_relocations(&out);
        let kept: Vec<_> = before.iter().filter(|r| !r.3).cloned().collect();
        let mut after_sorted = after.clone();
        after_sorted.sort();
        let mut kept_sorted = kept;
        kept_sorted.sort();
        assert_eq!(after_sorted, kept_sorted);
    }

    #[test]
    fn xdp_kfunc_calls_get_btf_ids() {
        check_patched(GUARD_XDP_CT, "bpf_xdp_ct_lookup");
    }

    #[test]
    fn tc_kfunc_calls_get_btf_ids() {
        check_patched(GUARD_TC_CT, "bpf_skb_ct_lookup");
    }

    #[test]
    fn unresolvable_kfunc_is_named_in_the_error() {
        let err = relocate_kfuncs_with(GUARD_XDP_CT, |n| (n != "bpf_ct_release").then_some(7)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bpf_ct_release"), "{msg}");
        assert!(!msg.contains("bpf_xdp_ct_lookup"), "{msg}");
        assert_eq!(crate::error::exit_code(&err), 5, "a kernel limitation, not a bug");

        let err = relocate_kfuncs_with(GUARD_TC_CT, |_| None).unwrap_err().to_string();
        assert!(err.contains("bpf_ct_release") && err.contains("bpf_skb_ct_lookup"), "{err}");
    }

    #[test]
    fn objects_without_kfuncs_are_unchanged() {
        let out = relocate_kfuncs_with(natfix_ebpf::objects::GUARD_OWN, |_| None).unwrap();
        assert_eq!(out, natfix_ebpf::objects::GUARD_OWN);
    }

    /// The two steps aya 0.14 failed on (BTF fix-up and call linking) pass
    /// after the fix-up, and fail without it.
    #[test]
    fn aya_obj_accepts_patched_objects() {
        let features = aya_obj::btf::BtfFeatures::new(true, true, true, true, true, true, true, true);
        for object in [GUARD_XDP_CT, GUARD_TC_CT] {
            let mut raw = aya_obj::Object::parse(object).unwrap();
            assert!(raw.fixup_and_sanitize_btf(&features).is_err(), "aya fixed .ksyms by itself?");
            let text: HashSet<usize> = raw.functions.keys().map(|(s, _)| *s).collect();
            assert!(raw.relocate_calls(&text).is_err(), "aya linked kfunc calls by itself?");

            let out = relocate_kfuncs_with(object, fake_id).unwrap();
            let mut obj = aya_obj::Object::parse(&out).unwrap();
            obj.fixup_and_sanitize_btf(&features).unwrap();
            let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
            obj.relocate_calls(&text).unwrap();
        }
    }

    /// bpftool (a build dependency of natfix-ebpf) reads the patched BTF as
    /// the kernel will: no extern FUNC, no `.ksyms` DATASEC.
    #[test]
    fn btf_has_no_externs_left() {
        let out = relocate_kfuncs_with(GUARD_XDP_CT, fake_id).unwrap();
        let path = std::env::temp_dir().join(format!("natfix-kfunc-test-{}.o", std::process::id()));
        std::fs::write(&path, &out).unwrap();
        let dump = std::process::Command::new("bpftool").args(["btf", "dump", "file"]).arg(&path).output();
        std::fs::remove_file(&path).unwrap();
        let dump = String::from_utf8(dump.expect("bpftool runs").stdout).unwrap();
        assert!(dump.contains("FUNC 'bpf_xdp_ct_lookup'"), "{dump}");
        assert!(!dump.contains("linkage=extern"), "{dump}");
        assert!(!dump.contains(".ksyms"), "{dump}");
        for f in ["bpf_xdp_ct_lookup", "bpf_ct_release"] {
            assert!(
                dump.lines().any(|l| l.contains(&format!("FUNC '{f}'")) && l.ends_with("linkage=global")),
                "{dump}"
            );
            assert!(dump.lines().any(|l| l.trim_start().starts_with(&format!("'{f}' type_id="))), "member {f}: {dump}");
        }
    }
}
