"""`python -m relay.openapi > docs/openapi.json`."""

import json

from . import openapi_document

print(json.dumps(openapi_document(simulated=True), indent=2, ensure_ascii=False))
