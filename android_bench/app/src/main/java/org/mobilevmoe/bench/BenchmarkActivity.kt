package org.mobilevmoe.bench

import android.app.Activity
import android.os.Bundle
import android.util.Log
import android.view.WindowManager
import android.widget.TextView
import java.io.File

/**
 * Entry point driven over adb (no instrumentation):
 *
 *   adb shell am start -W -S -n org.mobilevmoe.bench/.BenchmarkActivity \
 *       --es model /data/local/tmp/vmoe/model.pte --es shape 1,3,224,224 \
 *       --ei warmup 10 --ei iterations 50 [--ei threads 4] --es out vmoe_bench.json \
 *       [--es sidecar /data/local/tmp/vmoe/model.pte.json --es images /data/local/tmp/vmoe/images]
 *
 * With `images`, iteration i runs on image i mod N (index.txt gives the order), preprocessed as the sidecar's
 * `preprocess` says; without it, on one random input.
 *
 * Writes files/<out> (and a copy under the external files dir) when done, or files/<out>.error.txt on failure;
 * both are written to a temporary name first and renamed, so a file that exists is complete.
 */
class BenchmarkActivity : Activity() {
    companion object {
        const val TAG = "VMoEBench"
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        window.addFlags(WindowManager.LayoutParams.FLAG_KEEP_SCREEN_ON) // no doze / screen-off mid-run
        val status = TextView(this).apply { text = "running benchmark..." }
        setContentView(status)

        val out = intent.getStringExtra("out") ?: "vmoe_bench.json"
        val model = intent.getStringExtra("model")
        val shapeArg = intent.getStringExtra("shape") ?: "1,3,224,224"
        Thread({
            val message = try {
                requireNotNull(model) { "missing --es model /data/local/tmp/.../model.pte" }
                val shape = shapeArg.split(",").map { it.trim().toLong() }.toLongArray()
                val config = BenchConfig(
                    modelPath = model,
                    shape = shape,
                    warmup = intent.getIntExtra("warmup", 10),
                    iterations = intent.getIntExtra("iterations", 50),
                    threads = intent.getIntExtra("threads", 0),
                    sidecarPath = intent.getStringExtra("sidecar"),
                    imagesDir = intent.getStringExtra("images")
                )
                Log.i(TAG, "start $config")
                val json = Benchmark.run(this, config).toString(2)
                writeAtomic(File(filesDir, out), json)
                getExternalFilesDir(null)?.let { writeAtomic(File(it, out), json) }
                val stats = org.json.JSONObject(json).getJSONObject("stats")
                "done: p50 ${"%.3f".format(stats.getDouble("p50"))} ms -> files/$out"
            } catch (e: Throwable) {
                Log.e(TAG, "benchmark failed", e)
                writeAtomic(File(filesDir, "$out.error.txt"), "${e.javaClass.simpleName}: ${e.message}")
                "failed: ${e.message}"
            }
            Log.i(TAG, message)
            runOnUiThread {
                status.text = message
                finish()
            }
        }, "vmoe-bench").start()
    }

    private fun writeAtomic(target: File, text: String) {
        target.parentFile?.mkdirs()
        val tmp = File(target.parentFile, ".${target.name}.tmp")
        tmp.writeText(text)
        if (!tmp.renameTo(target)) {
            target.delete()
            check(tmp.renameTo(target)) { "could not write $target" }
        }
    }
}
