#!/usr/bin/env python3
# Redis memory per channel of history: starts its own redis-server and a
# pushgate (the binary given) on the Redis engine, publishes N publications
# of SIZE bytes to each of CH channels through the batch API, and prints
# the growth of Redis used_memory per channel and per publication.
#
#   bench/redis-memory.py target/release/pushgate 1000 100 100
#   (binary, channels, publications per channel, data bytes)
import json, os, socket, subprocess, sys, time, urllib.request, tempfile
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
rport=free_port()
redis=subprocess.Popen(["redis-server","--port",str(rport),"--save","","--appendonly","no"],stdout=subprocess.DEVNULL)
deadline=time.time()+10
while subprocess.run(["redis-cli","-p",str(rport),"ping"],capture_output=True).stdout.strip()!=b"PONG":
    if time.time()>deadline: sys.exit("redis-server did not start")
    time.sleep(0.05)
def used():
    out=subprocess.check_output(["redis-cli","-p",str(rport),"info","memory"]).decode()
    return int([l for l in out.splitlines() if l.startswith("used_memory:")][0].split(":")[1])
cfg=f"""listen: 127.0.0.1:0
upstream: {{url: 'http://127.0.0.1:9'}}
api: {{listen: '127.0.0.1:0', keys: [k]}}
auth: {{mode: none}}
engine: {{kind: redis, redis: {{url: 'redis://127.0.0.1:{rport}'}}}}
history: {{size: 100, ttl: 10m}}
log: {{format: json}}
"""
scratch=tempfile.mkdtemp()
config=os.path.join(scratch,"pushgate.yaml")
open(config,"w").write(cfg)
gate=subprocess.Popen([sys.argv[1],"--config",config],stderr=subprocess.PIPE)
api=None
for line in gate.stderr:
    try: e=json.loads(line)
    except: continue
    if e.get("message")=="listening": api=e["api_addr"]; break
base=used()
CH=int(sys.argv[2]); N=int(sys.argv[3]); SIZE=int(sys.argv[4])
data={"text":"x"*SIZE}
for n in range(N):
    batch=[{"channel":f"room:{c}","data":data} for c in range(CH)]
    req=urllib.request.Request(f"http://{api}/api/publish",data=json.dumps(batch).encode(),headers={"Authorization":"Bearer k","Content-Type":"application/json"})
    urllib.request.urlopen(req).read()
after=used()
print(f"channels={CH} publications/channel={N} data={SIZE}B: {(after-base)/CH:.0f} bytes per channel, {(after-base)/CH/N:.0f} per publication")
gate.terminate(); redis.terminate()
