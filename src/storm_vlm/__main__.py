from storm_vlm.cli import main

raise SystemExit(main())
