"""The session's H200 table: the full benchmark run (a9961d2 tree) with its 901 / 11948 / 14107 rows
replaced by the later runs of the Mosaic GEMM path (mosaic_901/: 719e327, mosaic_large/: 09a0bb3; the
rows at T <= 80 run the same kernels in all three trees). Each row's peer figure comes from the peer run
of the same device call as its project row. Usage: python3 combine.py <this directory>
"""
import json, math, sys
R = sys.argv[1]
def rows(path):
  out = []
  for l in open(path):
    r = json.loads(l)
    if r.get("record") == "header" or "pipelined_us" not in r: continue
    out.append(r)
  return out
def peers(path):
  out = {}
  for l in open(path):
    r = json.loads(l)
    if r.get("record") == "header": continue
    out[(r.get("T") or r.get("num_tokens"), r.get("scenario") or r.get("routing"))] = r
  return out
first = rows(f"{R}/proj_uniform.jsonl") + rows(f"{R}/proj_all_local.jsonl")
p_first = peers(f"{R}/peer.jsonl")
k = lambda r: (r["T"], r["scenario"])
new = {}
for f, pf in ((f"{R}/mosaic_large/proj_large.jsonl", f"{R}/mosaic_large/peer.jsonl"),
              (f"{R}/mosaic_large/proj_all_local.jsonl", f"{R}/mosaic_large/peer.jsonl"),
              (f"{R}/mosaic_901/proj_901.jsonl", f"{R}/mosaic_901/peer_901.jsonl")):
  pp = peers(pf)
  for r in rows(f): new[k(r)] = (r, pp[k(r)], f.split("/")[-2])
lines = ["| T | routing | floor µs | pipelined µs (×floor) | kernel sum µs (×floor) | peer GEMM path µs (kernels-only) | pipelined / peer | run |",
         "|---|---|---|---|---|---|---|---|"]
log_p = log_k = log_peer = 0.0; n = 0; faster_p = faster_k = 0; total = 0
for r in first:
  key = k(r)
  if key in new:
    r, peer, run = new[key]
  else:
    peer, run = p_first[key], "full run (a9961d2 tree)"
  fl = r["floor_us"]; pu = r["pipelined_us"]; ks = r["kernel_sum_us"]; pk = peer["kernels_only_sum_us"]
  total += 1; faster_p += pu < pk; faster_k += ks < pk
  if r["scenario"] == "uniform":
    n += 1; log_p += math.log(pu / fl); log_k += math.log(ks / fl); log_peer += math.log(pk / fl)
  lines.append(f"| {r['T']} | {r['scenario']} | {fl:.1f} | {pu:.1f} ({pu/fl:.2f}) | {ks:.1f} ({ks/fl:.2f}) | {pk:.1f} | {pu/pk:.2f} | {run} |")
lines.append(f"| **geomean ×floor, {n} public uniform** | | | ({math.exp(log_p/n):.2f}) | ({math.exp(log_k/n):.2f}) | ({math.exp(log_peer/n):.2f}) | | |")
print("\n".join(lines))
print(f"rows faster than the peer's GEMM path: pipelined {faster_p}/{total}, kernel sum {faster_k}/{total}")
