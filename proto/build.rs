//! Compiles `paysuite/**/*.proto` with protox (no system `protoc`), writes the encoded
//! descriptor set (with source info, so reflection shows the comments) and generates
//! Rust with tonic-prost-build.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    collect_protos(&root.join("paysuite"), &mut files)?;
    files.sort();
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|file| file.strip_prefix(&root).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&relative)?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("paysuite_descriptor_set.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    let descriptor_set = compiler.file_descriptor_set();
    let packages: BTreeSet<String> = descriptor_set
        .file
        .iter()
        .map(|file| file.package().to_owned())
        .filter(|package| package.starts_with("paysuite."))
        .collect();

    // Start from a clean slate so that a package which stops producing code does not keep
    // a stale file from an earlier build.
    for package in &packages {
        match std::fs::remove_file(out_dir.join(format!("{package}.rs"))) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
    }

    tonic_prost_build::configure()
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(descriptor_set)?;

    // prost writes nothing for a package that declares only extensions (paysuite.api.v1),
    // but lib.rs includes one file per package: give such a package an empty file.
    for package in &packages {
        let generated = out_dir.join(format!("{package}.rs"));
        if !generated.exists() {
            std::fs::write(
                generated,
                "// This package declares no messages, enums or services.\n",
            )?;
        }
    }

    println!("cargo:rerun-if-changed=paysuite");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}

fn collect_protos(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    Ok(())
}
