"""List a token's objects as JSON, independently of keychain_ext.

Run as a child process: module and token label from the environment
(VIEW_MODULE, VIEW_TOKEN), the PIN from standard input (never argv).
"""

import json
import os
import sys

import PyKCS11
from PyKCS11.LowLevel import CKA_CLASS, CKA_ID, CKA_LABEL, CKF_TOKEN_INITIALIZED

CLASSES = {0: "data", 1: "certificate", 2: "public", 3: "private", 4: "secret"}

lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ["VIEW_MODULE"])
want = os.environ["VIEW_TOKEN"]
for slot in lib.getSlotList(tokenPresent=True):
    info = lib.getTokenInfo(slot)
    if info.flags & CKF_TOKEN_INITIALIZED and info.label.strip() == want:
        break
else:
    sys.exit(f"no token {want}")
session = lib.openSession(slot)
session.login(sys.stdin.read())
found = []
for obj in session.findObjects([]):
    try:
        cls, label, key_id = session.getAttributeValue(obj, [CKA_CLASS, CKA_LABEL, CKA_ID])
    except PyKCS11.PyKCS11Error as exc:  # e.g. a half-written object
        found.append({"class": "unreadable", "label": str(exc), "id": None})
        continue
    found.append(
        {
            "class": CLASSES.get(cls, cls),
            "label": label if label is None or isinstance(label, str) else bytes(label).decode(),
            "id": bytes(key_id).hex() if key_id is not None else None,
        }
    )
session.logout()
session.closeSession()
print(json.dumps(sorted(found, key=lambda o: (str(o["label"]), str(o["class"])))))
