"""A service's whole path without torch: one OIP request made from the graph's IOSpec.

Run as `python -c SERVICE_CHECK GRAPH`: torch is blocked, the request goes through
`flash_export.serving.protocol` (parse, check, run, answer) and every output must equal a direct
onnxruntime run. Prints "service ok {output: shape}".
"""

SERVICE_CHECK = """
import json, sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnxscript'):
            raise ImportError(name + ' is blocked: a service has no torch')

sys.meta_path.insert(0, _Block())
import numpy as np
from flash_export.core.feeds import make_feed
from flash_export.serving.batching import run_many
from flash_export.serving.protocol import DATATYPES, OIPModel
from flash_export.runtime import create_session, session_io

session = create_session(sys.argv[1])
io = session_io(session)
model = OIPModel('m', session, io)
feed = make_feed(io, io.clamp({n: 2 if n == 'batch' else 7 for n in io.dynamic}), seed=0)
body = json.dumps({'inputs': [{'name': n, 'datatype': DATATYPES[a.dtype.name],
                               'shape': list(a.shape), 'data': a.ravel().tolist()}
                              for n, a in feed.items()]}).encode()
request = model.parse(body)
(results,) = run_many(model, [request.feed])
headers, reply = model.answer(request, results)
answer = json.loads(reply)
for out, want in zip(answer['outputs'], session.run(None, feed)):
    got = np.asarray(out['data'], dtype=want.dtype).reshape(out['shape'])
    assert np.array_equal(got, want, equal_nan=True), out['name']
assert 'torch' not in sys.modules, 'the service imported torch'
print('service ok', {o['name']: o['shape'] for o in answer['outputs']})
"""
