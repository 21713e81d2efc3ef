"""DIRBS list file names, apart from the parsers so that recognising a name costs no pyarrow
import (the server imports the sync module, which only parses when a sync runs)."""

import re

_DATE = r"(?P<date>\d{8}(?:_\d{6})?)"
_LIST = r"(?P<list>blacklist|whitelist|notifications_(?P<nop>[^/]+?)|exceptions_(?P<eop>[^/]+?))"
FULL_NAME = re.compile(rf"^{_DATE}_{_LIST}\.(?:csv|zip)$", re.IGNORECASE)
DELTA_NAME = re.compile(rf"^{_DATE}_{_LIST}_delta_(?P<base>-?\d+)_(?P<run>-?\d+)_"
                        r"(?P<reason>[a-z_]+)\.(?:csv|zip)$", re.IGNORECASE)
