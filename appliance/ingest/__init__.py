"""Reading-center side: claim bundles from the drop folder, decrypt, verify, store into the PACS, receipts."""
