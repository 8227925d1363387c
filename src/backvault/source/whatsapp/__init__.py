"""WhatsApp's backups (``*.crypt15``): the file format, read and written as pure functions
over file objects (``crypt15``), with the few protobuf fields its header uses
(``protowire``). The workflows that import and export whole backup folders are in
``backvault.app.whatsapp``."""
