#!/usr/bin/env node
// Copies the exact ESM files the splash-page wallet imports from node_modules (installed with
// `npm ci` from package-lock.json) into bitmesh/portal/static/vendor/, byte for byte. The copies
// are committed: the router serves them and never runs npm.
//
//   node vendor.mjs                       copy (after `npm ci --ignore-scripts`)
//   node vendor.mjs --check [MODULES]     exit 1 unless every vendored file equals its source in
//                                         MODULES (default ./node_modules), the installed
//                                         versions are the lock file's, and vendor/ holds
//                                         nothing else
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const VENDOR = join(HERE, '..', 'static', 'vendor');

// package -> [vendor subdirectory, [file in the package, ...]]. Only what the wallet imports
// (and what those files import, all by relative path), plus each package's license.
export const MANIFEST = {
  '@noble/secp256k1': ['noble-secp256k1', ['index.js', 'LICENSE']],
  '@noble/hashes': ['noble-hashes', ['sha2.js', 'legacy.js', 'hmac.js', 'utils.js', '_md.js', '_u64.js', 'LICENSE']],
  '@scure/base': ['scure-base', ['index.js', 'LICENSE']],
  '@paulmillr/qr': ['qr', [['esm/index.js', 'index.js'], 'LICENSE-MIT']],
};

function entries() {
  const out = [];
  for (const [pkg, [dir, files]] of Object.entries(MANIFEST)) {
    for (const f of files) {
      const [src, dst] = Array.isArray(f) ? f : [f, f];
      out.push({ pkg, src, dst: join(dir, dst) });
    }
  }
  return out;
}

function walk(dir) {
  let files = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    files = statSync(p).isDirectory() ? files.concat(walk(p)) : files.concat([p]);
  }
  return files;
}

const sha256 = (path) => createHash('sha256').update(readFileSync(path)).digest('hex');

function lockedVersions() {
  const lock = JSON.parse(readFileSync(join(HERE, 'package-lock.json'), 'utf8'));
  const pkg = JSON.parse(readFileSync(join(HERE, 'package.json'), 'utf8'));
  const versions = {};
  for (const name of Object.keys(MANIFEST)) {
    const locked = lock.packages[`node_modules/${name}`];
    if (!locked) throw new Error(`${name} is not in package-lock.json`);
    if (pkg.dependencies[name] !== locked.version) {
      throw new Error(`${name}: package.json pins ${pkg.dependencies[name]}, the lock has ${locked.version}`);
    }
    versions[name] = locked.version;
  }
  return versions;
}

function checkInstalled(modules, versions) {
  for (const [name, version] of Object.entries(versions)) {
    const installed = JSON.parse(readFileSync(join(modules, name, 'package.json'), 'utf8')).version;
    if (installed !== version) throw new Error(`${name}: installed ${installed}, locked ${version}`);
  }
}

function copy(modules) {
  const versions = lockedVersions();
  checkInstalled(modules, versions);
  rmSync(VENDOR, { recursive: true, force: true });
  let total = 0;
  for (const { pkg, src, dst } of entries()) {
    const to = join(VENDOR, dst);
    mkdirSync(dirname(to), { recursive: true });
    copyFileSync(join(modules, pkg, src), to);
    total += statSync(to).size;
    console.log(`${pkg}@${versions[pkg]} ${src} -> vendor/${dst} (${statSync(to).size} bytes)`);
  }
  console.log(`${total} bytes vendored`);
}

function check(modules) {
  const problems = [];
  const versions = lockedVersions();
  try {
    checkInstalled(modules, versions);
  } catch (e) {
    problems.push(e.message);
  }
  const expected = new Set();
  for (const { pkg, src, dst } of entries()) {
    expected.add(dst);
    const from = join(modules, pkg, src);
    const to = join(VENDOR, dst);
    try {
      if (sha256(from) !== sha256(to)) problems.push(`vendor/${dst} differs from ${pkg}@${versions[pkg]}/${src}`);
    } catch (e) {
      problems.push(`vendor/${dst}: ${e.code || e.message}`);
    }
  }
  for (const file of walk(VENDOR)) {
    const rel = relative(VENDOR, file);
    if (!expected.has(rel)) problems.push(`vendor/${rel} is not in the manifest`);
  }
  if (problems.length) {
    console.error(problems.join('\n'));
    process.exit(1);
  }
  console.log(`vendor/ matches ${Object.entries(versions).map(([n, v]) => `${n}@${v}`).join(', ')}`);
}

const args = process.argv.slice(2);
if (args[0] === '--check') check(args[1] || join(HERE, 'node_modules'));
else copy(args[0] || join(HERE, 'node_modules'));
